"""CLI output for people: each line once, in the terminal and in the run's log file; the
project's lines and real warnings only (no Lightning tips or status lines, no third-party
notices); no carriage-return progress bars in files."""

from __future__ import annotations

import logging

from neurorecon.models.common.logging import configure_cli_logging, logger, progress


def test_cli_logging_lines_once_and_no_tips(tmp_path, capsys):
    root = logging.getLogger()
    file_handler = logging.FileHandler(tmp_path / "run.log")  # what Hydra puts on the root
    root.addHandler(file_handler)
    state = (logger.handlers[:], logger.level, logger.propagate,
             logging.getLogger("lightning").propagate)
    try:
        configure_cli_logging()
        configure_cli_logging()  # entry points may call it twice: still one handler each
        logger.info("stage summary")
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.setLevel(logging.INFO)
        rank_zero.info("💡 Tip: install something")
        rank_zero.info("GPU available: False")
        file_handler.flush()
        text = (tmp_path / "run.log").read_text()
        err = capsys.readouterr().err
        assert text.count("stage summary") == 1 and err.count("stage summary") == 1
        assert "Tip" not in text + err
        assert "GPU available" not in text + err  # Lightning's routine lines: dropped
        rank_zero.info("Initializing distributed")  # its other lines: its own handler only
        file_handler.flush()
        assert "Initializing distributed" not in (tmp_path / "run.log").read_text()
        # stderr is not a terminal here: no progress bar is drawn
        list(progress(range(3), desc="work"))
        assert "work" not in capsys.readouterr().err
    finally:
        root.removeHandler(file_handler)
        logger.handlers[:] = state[0]
        logger.setLevel(state[1])
        logger.propagate = state[2]
        logging.getLogger("lightning").propagate = state[3]


#: third-party console output a person should not see in a run's log (each was there once):
#: diffusers' `accelerate` notice and loading bars, Lightning's checkpoint / device / seed /
#: stop lines, tips and logging-interval warning, matplotlib's tight_layout warning, tqdm bars
#: (carriage returns) and Python warnings of any library
NOISE = [r"`accelerate`", r"low_cpu_mem_usage", r"Loading pipeline components", r"weights_only",
         r"GPU available:", r"TPU available:", r"Tip:", r"litlogger", r"Seed set to",
         r"`Trainer\.fit` stopped", r"log_every_n_steps", r"tight_layout", r"it/s\]", r"\r",
         r"^INFO: ", r"\b(User|Future|Deprecation|Runtime)Warning\b"]


def test_run_output_is_the_projects_own(sample_root, tmp_path):
    """A tiny `neurorecon run` (fMRI, with the embedded generator) into a pipe, as into a log
    file: no third-party noise. Then the preprocessing figure of its cache: no warnings."""
    import re
    import subprocess
    import sys
    import warnings

    from neurorecon.pipelines.preprocess.run import plot_preprocessed
    from neurorecon.pipelines.preprocess.store import load_preprocessed

    from .test_bundle import FAST, TINY_GENERATOR
    from .test_train import SMALL_FMRI

    out = subprocess.run(
        [sys.executable, "-m", "neurorecon.serve.cli", "run", "data=bids",
         f"data.root={sample_root / 'fmri'}", "data.modality=fmri", f"paths.root_dir={tmp_path}",
         *FAST, *SMALL_FMRI, *TINY_GENERATOR],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    text = out.stdout
    assert out.returncode == 0, text[-3000:]
    assert "[neurorecon] reconstruct:" in text and "[neurorecon] done:" in text
    noisy = [line for line in text.split("\n")
             if any(re.search(p, line) for p in NOISE)]
    assert not noisy, "third-party output in the run's console:\n" + "\n".join(noisy)

    cache = re.search(r"preprocess cache: (\S+)", text).group(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_preprocessed(load_preprocessed(cache), tmp_path / "preprocess_fmri.png")
    assert not [str(w.message) for w in caught]
