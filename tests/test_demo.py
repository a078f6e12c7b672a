"""make demo's report and progress line (the demo itself trains every stage: too slow for the suite)."""
from nanodalle import demo


def test_report_has_every_step_its_metrics_and_the_evaluation(tmp_path):
    times = {"dvae": 540.0, "clip": 726.0, "sample dalle1": 30.0, "evaluate": 90.0}
    metrics = {"dvae": {"step": 4000, "psnr": 26.7792}, "clip": {"top1_t2i": 0.976}}
    evaluation = {"dalle1_val_single": 0.390625, "dalle2_val_ddim50": 0.055}
    path = tmp_path / "report.md"
    demo.write_report(str(path), times, metrics, evaluation)
    text = path.read_text()
    assert "| dvae | 9.0 | step 4000, psnr 26.78 |" in text
    assert "| clip | 12.1 | top1_t2i 0.976 |" in text
    for name, _ in demo.STAGES[2:]:  # not run this time: said so, never left out
        assert f"| {name} | skipped (complete) |" in text, name
    assert "| sample dalle1 | 0.5 |" in text and "| evaluate | 1.5 |" in text
    assert "| dalle1_val_single | 0.3906 |" in text and "| dalle2_val_ddim50 | 0.055 |" in text
    assert "![DALL-E 1](dalle1.png)" in text and "![DALL-E 2](dalle2.png)" in text


def test_overall_progress_line():
    line = demo.overall(3, 9, t0=0.0)
    assert line.startswith("[" + "#" * 7 + "-" * 13 + "] 3/9 steps")
    assert demo.overall(9, 9, t0=0.0).startswith("[" + "#" * 20 + "] 9/9")
