"""Every HTML artifact of a real local run, as the Kubeflow UI's side pane shows it: headless Chromium.

The run is the suite's end-to-end run (conftest's ``local_run``), with its own page (index.html) and a
page comparing it with the suite's second run (pipelines/runs.py). Each page
is opened at 800 px (about the Run UI's side pane) and 1280 px; the page must
not scroll sideways (a wide table scrolls inside its own box), every picture
must be decoded and embedded (the UI's frame can load nothing else), and a
full-page screenshot goes to ``<run folder>/screenshots/`` for a person to look at.
"""

import browser
import pytest

pytestmark = pytest.mark.skipif(bool(browser.missing()), reason=browser.missing() or "")

STEPS = ("augment/preview", "search-result/trials_plot", "finetune/curves", "prune/report_html", "evaluate/report_html")


@pytest.fixture(scope="module")
def chromium():
    with browser.Browser() as opened:
        yield opened


@pytest.mark.e2e
def test_every_html_artifact_fits_the_side_pane_with_every_picture_shown(local_run, chromium):
    run_dir = local_run[0]
    pages = browser.html_artifacts(run_dir)
    assert {str(p.relative_to(run_dir)) for p in pages} >= set(STEPS), pages
    problems = []
    for page in pages:
        for width in browser.WIDTHS:
            shot = browser.shot_name(run_dir, page, width)
            seen = chromium.render(page, width, shot)
            where = f"{page.relative_to(run_dir)} at {width} px"
            if seen["scroll_width"] > seen["viewport"]:
                problems.append(f"{where}: the page is {seen['scroll_width']} px wide")
            if seen["broken"] or seen["external"]:
                problems.append(f"{where}: broken {seen['broken']}, not embedded {seen['external']}")
            if page.parent.name != "prune" and seen["images"] < 1:
                problems.append(f"{where}: no picture")
            assert shot.stat().st_size > 1000, shot
    assert not problems, "\n".join(problems)


def test_a_compare_table_too_wide_for_the_pane_scrolls_in_its_box_and_keeps_the_gate_in_view(chromium, tmp_path):
    # Long model file names and failures: wider than 800 px however it wraps.
    from kftune import evaluate as ev

    def candidate(name, accuracy, gzip_bytes):
        return ev.Evaluation(
            name=name, accuracy=accuracy, loss=0.3, top_k=3, top_k_accuracy=0.99, class_names=["a", "b"],
            precision=[1.0, 1.0], recall=[1.0, 1.0], f1=[1.0, 1.0], confusion_matrix=[[1, 0], [0, 1]],
            size_bytes=123_456_789, gzip_bytes=gzip_bytes, parameters=123_456_789, latency_ms_batch1=123.456,
            latency_ms_batch32=4567.89, examples=2, model_file=f"{name}_with_a_rather_long_file_name_int8.tflite")

    candidates = [candidate("baseline", 0.9, 90_000_000), candidate("structured_pruned_and_quantized", 0.5, 1_000)]
    gate = ev.GateConfig(min_accuracy=0.8, max_accuracy_drop=0.01, max_size_bytes=10_000_000)
    page = tmp_path / "compare"
    page.write_text(ev.comparison_html(candidates, gate, ev.choose(candidates, gate)))
    seen = chromium.render(page, 800, tmp_path / "compare-800.png")
    assert seen["scroll_width"] <= seen["viewport"] and not seen["broken"]
    # The gate column's right edge is inside the pane: the decision is never behind the scrollbar.
    right = chromium.driver.execute_script(
        "return document.querySelector('table.compare th:nth-child(2)').getBoundingClientRect().right")
    assert right <= seen["viewport"]


@pytest.mark.e2e
def test_the_run_page_and_the_compare_page_fit_the_pane_with_every_picture_shown(local_run, gate_failed_run,
                                                                                 chromium, tmp_path):
    # pipelines/runs.py's pages: the run's index.html (written by the run) and a comparison of the suite's two runs.
    from pipelines import runs

    run_dir = local_run[0]
    compare_page, _ = runs.compare([run_dir, gate_failed_run[0]], tmp_path / "compare.html")
    problems = []
    for page, name, pictures in ((run_dir / "index.html", "index", 4), (compare_page, "compare", 6)):
        for width in browser.WIDTHS:
            shot = run_dir / "screenshots" / f"runs-{name}-{width}.png"
            seen = chromium.render(page, width, shot)
            where = f"{name} at {width} px"
            if seen["scroll_width"] > seen["viewport"]:
                problems.append(f"{where}: the page is {seen['scroll_width']} px wide")
            if seen["broken"] or seen["external"] or seen["images"] < pictures:
                problems.append(f"{where}: {seen['images']} pictures, broken {seen['broken']}, "
                                f"not embedded {seen['external']}")
            assert shot.stat().st_size > 1000, shot
    assert not problems, "\n".join(problems)
