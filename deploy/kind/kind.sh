#!/usr/bin/env bash
# kftune on a local kind cluster: `make kind-up`, `make kind-load`, `make kind-e2e`.
#
#   up    a kind cluster with Kubeflow Pipelines' standalone manifests at KFP_VERSION,
#         and the volume the steps share (kftune reads and writes gs:// or mounted
#         paths, not the MinIO that KFP uses for its own artifacts)
#   load  the CPU image into the cluster's node (every step runs in it on kind)
#   e2e   the pipeline compiled with the CPU profile plus that volume, submitted
#         with a small configuration; waits for the run and fails unless it SUCCEEDED
#
# Needs docker with a running engine, kind and kubectl; without them it says so
# and exits 0 (skipped), so a machine without a cluster can run `make kind-e2e`.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${KFP_VERSION:?KFP_VERSION is not set: run through make}"
: "${KIND_CLUSTER:=kftune}"
: "${KFTUNE_CPU_IMAGE:?KFTUNE_CPU_IMAGE is not set: run through make}"
: "${KFP_PORT:=8080}"
: "${KFTUNE:=.venv/bin/kftune}"
here=deploy/kind
manifests=github.com/kubeflow/pipelines/manifests/kustomize

missing=""
command -v docker >/dev/null || missing="docker is not installed"
[ -n "$missing" ] || docker info >/dev/null 2>&1 || missing="no Docker engine is running (\`docker info\` failed)"
[ -n "$missing" ] || command -v kind >/dev/null || missing="kind is not installed (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
[ -n "$missing" ] || command -v kubectl >/dev/null || missing="kubectl is not installed"
if [ -n "$missing" ]; then
  echo "make kind-$1: skipped: $missing."
  exit 0
fi
context="kind-$KIND_CLUSTER"

up() {
  kind get clusters | grep -qx "$KIND_CLUSTER" || kind create cluster --name "$KIND_CLUSTER" --config "$here/cluster.yaml"
  # The standalone install at the pinned release; env/dev pins its images to master.
  kubectl --context "$context" apply -k "$manifests/cluster-scoped-resources?ref=$KFP_VERSION"
  kubectl --context "$context" wait --for condition=established --timeout=120s crd --all
  kubectl --context "$context" apply -k "$manifests/env/platform-agnostic?ref=$KFP_VERSION"
  kubectl --context "$context" apply -f "$here/shared-volume.yaml"
  echo "waiting for Kubeflow Pipelines $KFP_VERSION to come up (several minutes the first time)..."
  kubectl --context "$context" -n kubeflow wait --for=condition=Available --timeout=20m deployment --all
  echo "Kubeflow Pipelines is up: kubectl --context $context port-forward -n kubeflow svc/ml-pipeline-ui $KFP_PORT:80"
}

load() {
  docker image inspect "$KFTUNE_CPU_IMAGE" >/dev/null 2>&1 \
    || { echo "make kind-load: $KFTUNE_CPU_IMAGE is not built here: run \`make images\` first." >&2; exit 2; }
  kind load docker-image "$KFTUNE_CPU_IMAGE" --name "$KIND_CLUSTER"
}

e2e() {
  # Every step in the CPU image (the one kind-load loaded), with the CPU profile.
  KFTUNE_IMAGE="$KFTUNE_CPU_IMAGE" "$KFTUNE" compile --profile "$here/profile.yaml" --output build/kind/tuning_pipeline.yaml
  kubectl --context "$context" port-forward -n kubeflow svc/ml-pipeline-ui "$KFP_PORT:80" >/dev/null &
  forward=$!
  trap 'kill $forward' EXIT
  for _ in $(seq 30); do
    .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://localhost:$KFP_PORT/apis/v2beta1/healthz')" \
      2>/dev/null && break
    sleep 1
  done
  run="kind-e2e-$(date -u +%Y%m%d-%H%M%S)"
  "$KFTUNE" submit --host "http://localhost:$KFP_PORT" --compiled build/kind/tuning_pipeline.yaml \
    --experiment kftune-kind --run-name "$run" --wait --timeout 3600 \
    search_state_uri="/mnt/kftune/search/$run" export_destination=/mnt/kftune/exports export_version="$run" \
    image_size=16 max_trials=2 parallel_trials=2 trial_epochs=1 \
    finetune_epochs=1 prune_epochs=1 max_accuracy_drop=0.5
}

case "${1:-}" in
  up) up ;;
  load) load ;;
  e2e) e2e ;;
  *) echo "usage: $0 up|load|e2e" >&2; exit 2 ;;
esac
