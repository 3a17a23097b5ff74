"""``kftune reproduce``: the data checked first, the same run again, the figures compared."""

import json

import pytest

from kftune import dataset, fixtures
from kftune import export as ex
from kftune.errors import InputError
from pipelines import cli, reproduce


@pytest.mark.e2e
def test_the_suites_run_reproduces_exactly_from_its_export(local_run, tmp_path, capsys):
    """The suite's real run, run again from what its export recorded: same seed, same machine, same figures."""
    _, _, exports = local_run
    recorded = ex.read_metadata(exports / "1")
    assert recorded["parameters"]["max_trials"] == 3 and recorded["code_version"]["kftune"] == "0.1.0"

    code = cli.main(["reproduce", str(exports), "--pipeline-root", str(tmp_path / "runs"),
                     "--export-destination", str(tmp_path / "reproduced"), "--tolerance", "0"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err
    assert "the data's fingerprint matches the export's" in out
    for candidate in ("baseline", "finetuned", "pruned"):
        line = next(line for line in out.splitlines() if line.startswith(candidate))
        assert line.rstrip().endswith("same"), line
    assert f"chosen: recorded {recorded['candidate']}, rerun {recorded['candidate']}" in out
    # The rerun exported to its own base, with fresh state: the original base is untouched.
    again = ex.read_metadata(tmp_path / "reproduced" / "1")
    assert again["parameters"]["search_state_uri"] == "" and ex.numbers(str(exports)) == [1]
    assert [e["accuracy"] for e in again["evaluations"]] == [e["accuracy"] for e in recorded["evaluations"]]


def test_changed_data_is_refused_before_anything_runs(tmp_path):
    source = tmp_path / "photos"
    fixtures.make_photos(source, 24, size=32)
    info = dataset.ingest(dataset.IngestConfig(source=str(source), image_size=16), tmp_path / "data",
                          progress=lambda _: None)
    metadata = {"version": "4", "data_fingerprint": info.fingerprint,
                "parameters": {"source": str(source), "image_size": 16}}
    assert reproduce.check_data(metadata, tmp_path / "check1") == info.fingerprint

    import tensorflow as tf

    # Someone retouched a photo. (A copy of another photo would now be left out of its split as a copy, and
    # with 4 photos a class, that could leave a split without the class: refused as such before any fingerprint.)
    one = next(p for p in sorted(source.rglob("*.jpg")))
    one.write_bytes(tf.io.encode_jpeg(tf.image.flip_left_right(tf.io.decode_jpeg(one.read_bytes()))).numpy())
    with pytest.raises(InputError, match=rf"^the data at `{source}` changed since version 4 was exported \(fingerprint "
                                         rf"{info.fingerprint[:12]}\.\.\., now [0-9a-f]{{12}}\.\.\.\): a rerun would not "
                                         r"repeat it\. Restore the data, or train on the new data with `kftune run-local`\.$"):
        reproduce.check_data(metadata, tmp_path / "check2")


def test_an_export_without_recorded_parameters_is_refused_in_one_line(trained_model_dir, digits_dir, tmp_path, capsys):
    uri, _ = ex.export(trained_model_dir, str(tmp_path / "models"), {"source_run": "run-1"}, dataset_dir=digits_dir)
    assert cli.main(["reproduce", uri, "--pipeline-root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"kftune: error: `{uri}` was exported before kftune recorded a run's parameters (its metadata.json "
                   "has none): it cannot be reproduced; export it again with this kftune.")
    assert not (tmp_path / "runs").exists()


def test_the_rerun_takes_nothing_that_would_resume_or_replace_the_original():
    metadata = {"parameters": {"max_trials": 4, "search_state_uri": "gs://b/state", "checkpoint_uri": "gs://b/ck",
                               "serving_name": "flowers", "export_destination": "gs://b/models", "export_version": "7"}}
    before = json.loads(json.dumps(metadata))
    assert reproduce.arguments(metadata, "runs/reproduced") == {
        "max_trials": 4, "search_state_uri": "", "checkpoint_uri": "", "serving_name": "", "export_version": "",
        "export_destination": "runs/reproduced"}
    assert metadata == before  # the recorded parameters are left as they were
