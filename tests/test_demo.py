"""End-to-end smoke test of `python -m diffq_c.demo`, run in-process.

The quantizer package under test is $DIFFQ_DEMO_PACKAGE (default `diffq_c`),
the same variable the demo reads. A missing package makes the test fail,
never skip: the demo is part of what diffq_c ships.
"""
import os

from diffq_c import demo

PACKAGE = os.environ.get(demo.PACKAGE_ENV_VAR, demo.DEFAULT_PACKAGE)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_tiny_run(tmp_path, capsys):
    result = demo.main(["--package", PACKAGE, "--penalties", "0.01", "--epochs", "1",
                        "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out

    # The table: a header with every column, a rule, then one row per penalty.
    table_lines = result["table"].splitlines()
    assert len(table_lines) == 3
    header = table_lines[0]
    for column in demo.TABLE_COLUMNS:
        assert column in header
    assert result["table"] in printed
    assert table_lines[2].split("|")[0].strip() == "0.01"
    assert len(result["rows"]) == 1
    row = result["rows"][0]
    assert 0 <= row["accuracy"] <= 100
    assert row["size_kb"] > 0
    assert row["compression"] > 1  # quantized below float32
    assert 1 <= row["mean_bits"] <= 15

    plot_path = tmp_path / demo.PLOT_NAME
    assert result["plot_path"] == plot_path
    assert plot_path.stat().st_size > 0
    assert plot_path.read_bytes()[:8] == PNG_MAGIC
    from matplotlib import image
    pixels = image.imread(plot_path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100

    state_path = tmp_path / demo.STATE_NAME
    assert result["state_path"] == state_path
    assert state_path.stat().st_size > 0

    # main() raises SystemExit(1) on a mismatch; check the result and output too.
    assert result["reload_ok"]
    assert result["reload_accuracy"] == row["accuracy"]
    assert "identical predictions" in printed


def test_demo_compare_diffq_adds_reference_columns(tmp_path, capsys):
    result = demo.main(["--package", PACKAGE, "--penalties", "0", "--epochs", "1",
                        "--out", str(tmp_path), "--no-progress", "--compare-diffq"])
    printed = capsys.readouterr().out
    try:
        import diffq  # noqa: F401
    except ImportError:
        # Without the reference the demo says so and carries on.
        assert "not installed" in printed
        assert "reference_accuracy" not in result["rows"][0]
        return
    header = result["table"].splitlines()[0]
    for column in demo.REFERENCE_COLUMNS:
        assert column in header
    row = result["rows"][0]
    assert 0 <= row["reference_accuracy"] <= 100
    assert row["reference_size_kb"] > 0
    assert row["speedup"] > 0
