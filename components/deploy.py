"""Deploy component: serves the exported version with KServe and waits until it answers."""

from kfp import dsl
from kfp.dsl import Artifact, Markdown, Output

from components import KFTUNE_CPU_IMAGE


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
def deploy(
    exported_uri: str,
    config: str,
    report: Output[Markdown],
    manifest: Output[Artifact],
):
    """Applies the InferenceService stored in the exported version and waits until it is Ready.

    Runs only when the gate passed and serving_name is set. It talks to the
    Kubernetes API as the run's service account, which needs get, list, create
    and update on inferenceservices.serving.kserve.io in the serving namespace.
    A deploy that is refused or not Ready within serving_timeout fails the step
    (exit code 4); the export stays stored as it is.

    Args:
        exported_uri: The version the export step wrote (it holds inferenceservice.yaml).
        config: The deploy settings (from the validation step): serving_name,
            serving_namespace, serving_storage_uri, canary_traffic_percent, serving_timeout.
        report: Output: the outcome, the URLs, a curl line to query it, and the manifest.
        manifest: Output: the InferenceService applied (YAML).
    """
    from kftune import deploy as dp
    from kftune import parameters
    from kftune.errors import user_errors

    with user_errors():
        outcome = dp.deploy_version(exported_uri, parameters.load(dp.DeployConfig, config))
        with open(report.path, "w") as f:
            f.write(outcome.markdown())
        with open(manifest.path, "w") as f:
            f.write(outcome.manifest_text)
        outcome.check()
    print(f"deploy: {outcome.result.message}; {outcome.result.url or outcome.result.address}")
