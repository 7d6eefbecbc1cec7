"""CLI output for people: each line once, in the terminal and in the run's log file; no
Lightning tips; no carriage-return progress bars in files."""

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
        assert "GPU available" not in text  # Lightning's lines: its own console handler only
        # stderr is not a terminal here: no progress bar is drawn
        list(progress(range(3), desc="work"))
        assert "work" not in capsys.readouterr().err
    finally:
        root.removeHandler(file_handler)
        logger.handlers[:] = state[0]
        logger.setLevel(state[1])
        logger.propagate = state[2]
        logging.getLogger("lightning").propagate = state[3]
