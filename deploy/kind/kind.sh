#!/usr/bin/env bash
# kftune on a local kind cluster: `make kind-up`, `make kind-load`, `make kind-e2e`.
#
#   up    a kind cluster with Kubeflow Pipelines' standalone manifests at KFP_VERSION,
#         the volume the steps share (kftune reads and writes gs:// or mounted
#         paths, not the MinIO that KFP uses for its own artifacts), and KServe at
#         KSERVE_VERSION in raw deployment (Standard) mode, with the RBAC the
#         pipeline's deploy step needs
#   load  the CPU image into the cluster's node (every step, and kftune's KServe
#         predictor, runs in it on kind)
#   e2e   the pipeline compiled with the CPU profile plus that volume, submitted
#         with a small configuration and serving_name set; waits for the run and
#         fails unless it SUCCEEDED, then sends the deployed model a JPEG through a
#         port-forward and fails unless a class name comes back
#
# Needs docker with a running engine, kind and kubectl (and helm for `up`);
# without them it says so and exits 0 (skipped), so a machine without a cluster
# can run `make kind-e2e`.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${KFP_VERSION:?KFP_VERSION is not set: run through make}"
: "${KSERVE_VERSION:?KSERVE_VERSION is not set: run through make}"
: "${CERT_MANAGER_VERSION:?CERT_MANAGER_VERSION is not set: run through make}"
: "${KIND_CLUSTER:=kftune}"
: "${KFTUNE_CPU_IMAGE:?KFTUNE_CPU_IMAGE is not set: run through make}"
: "${KFP_PORT:=8080}"
: "${SERVING_PORT:=8081}"
: "${KFTUNE:=.venv/bin/kftune}"
here=deploy/kind
manifests=github.com/kubeflow/pipelines/manifests/kustomize

missing=""
command -v docker >/dev/null || missing="docker is not installed"
[ -n "$missing" ] || docker info >/dev/null 2>&1 || missing="no Docker engine is running (\`docker info\` failed)"
[ -n "$missing" ] || command -v kind >/dev/null || missing="kind is not installed (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
[ -n "$missing" ] || command -v kubectl >/dev/null || missing="kubectl is not installed"
[ -n "$missing" ] || [ "${1:-}" != up ] || command -v helm >/dev/null \
  || missing="helm is not installed (https://helm.sh/docs/intro/install/; KServe's charts need it)"
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
  kserve
}

kserve() {
  # As KServe's own quick install does it (hack/setup/quick-install/kserve-standard-mode-full-install-helm.sh
  # at the release tag): cert-manager for the webhook's certificates, then KServe's released charts.
  helm repo add jetstack https://charts.jetstack.io --force-update >/dev/null
  helm upgrade -i cert-manager jetstack/cert-manager --kube-context "$context" --namespace cert-manager \
    --create-namespace --version "$CERT_MANAGER_VERSION" --set crds.enabled=true --wait
  helm upgrade -i kserve-crd oci://ghcr.io/kserve/charts/kserve-crd --kube-context "$context" --namespace kserve \
    --create-namespace --version "$KSERVE_VERSION" --wait
  # Standard (raw deployment) mode: a Deployment and a Service per model, no Knative or Istio to install. No
  # Ingress either: kind has no ingress controller, and the e2e reaches the model through a port-forward.
  helm upgrade -i kserve-resources oci://ghcr.io/kserve/charts/kserve-resources --kube-context "$context" \
    --namespace kserve --version "$KSERVE_VERSION" --set kserve.version="$KSERVE_VERSION" \
    --set kserve.controller.deploymentMode=Standard --set kserve.controller.gateway.disableIngressCreation=true --wait
  kubectl --context "$context" -n kserve wait --for=condition=Available --timeout=5m deployment/kserve-controller-manager
  # The ClusterServingRuntimes, kserve-tensorflow-serving among them (the chart installs none unless asked).
  helm upgrade -i kserve-runtime-configs oci://ghcr.io/kserve/charts/kserve-runtime-configs --kube-context "$context" \
    --namespace kserve --version "$KSERVE_VERSION" --set kserve.version="$KSERVE_VERSION" \
    --set kserve.servingruntime.enabled=true --set kserve.llmisvcConfigs.enabled=false --wait
  # What the deploy step does as the pipeline's service account (kubeflow:pipeline-runner).
  kubectl --context "$context" apply -f "$here/serving-rbac.yaml"
  echo "KServe $KSERVE_VERSION is up (Standard mode); the pipeline's service account may deploy in kubeflow"
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
  serving=kftune-e2e
  # The exports go to the next free number under the shared volume; the deploy step serves it from there
  # (pvc://, the claim KServe mounts) as InferenceService $serving in kubeflow, the run's own namespace.
  "$KFTUNE" submit --host "http://localhost:$KFP_PORT" --compiled build/kind/tuning_pipeline.yaml \
    --experiment kftune-kind --run-name "$run" --wait --timeout 3600 \
    search_state_uri="/mnt/kftune/search/$run" export_destination=/mnt/kftune/exports \
    serving_name="$serving" serving_storage_uri=pvc://kftune-shared/exports serving_timeout=900 \
    image_size=16 max_trials=2 parallel_trials=2 trial_epochs=1 \
    finetune_epochs=1 prune_epochs=1 max_accuracy_drop=0.5
  query "$serving"
}

query() {
  # The run SUCCEEDED, so its deploy step saw the InferenceService Ready: ask it, as a client would.
  local name=$1
  kubectl --context "$context" -n kubeflow get inferenceservice "$name"
  kubectl --context "$context" -n kubeflow port-forward "svc/$name-predictor" "$SERVING_PORT:80" >/dev/null &
  serving_forward=$!
  trap 'kill "$forward" "$serving_forward"' EXIT
  # A real JPEG of a handwritten digit (the bundled digits are what the run trained on), KServe's V1 REST.
  .venv/bin/python - "http://localhost:$SERVING_PORT/v1/models/$name:predict" <<'PY'
import base64, json, sys, time, urllib.request

import cv2
import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
image = cv2.resize((digits.images[7] * 16).astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
ok, jpeg = cv2.imencode(".jpg", image)
assert ok, "could not encode the JPEG"
body = json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(jpeg.tobytes()).decode()}}]}).encode()
for attempt in range(30):
    try:
        request = urllib.request.Request(sys.argv[1], body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        break
    except OSError as e:  # the port-forward is still opening
        last = e
        time.sleep(2)
else:
    sys.exit(f"kind-e2e: no answer from {sys.argv[1]}: {last}")
labels = (answer.get("predictions") or [{}])[0].get("labels") or []
names = [str(n) for n in digits.target_names]
if not labels or str(labels[0]) not in names:
    sys.exit(f"kind-e2e: the deployed model gave no class name for a JPEG of a {digits.target[7]}: {answer}")
print(f"kind-e2e: the deployed model answers: a JPEG of a {digits.target[7]} is {labels[0]} (top {len(labels)}: {labels})")
PY
}

case "${1:-}" in
  up) up ;;
  load) load ;;
  e2e) e2e ;;
  *) echo "usage: $0 up|load|e2e" >&2; exit 2 ;;
esac
