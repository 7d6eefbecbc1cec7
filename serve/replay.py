"""``neurorecon replay replay.file=<recording.fif> replay.name=<stream> [replay.markers=true]``:
a recording as a live LSL stream (``mne_lsl.player.PlayerLSL``), to demo and test the
streaming decoder without hardware.

With ``replay.markers=true`` the recording's events go out as the marker stream
``<name>-markers`` (strings, irregular rate), each stamped with the LSL time of its onset
sample: the annotations of the file, or -- without annotations -- its BIDS ``*_events.tsv``
sidecar (``stim_file`` values, e.g. image ids) when there is one, else its stim-channel events
(their values).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from neurorecon.models.common.checks import DataError, read_tsv
from neurorecon.models.common.logging import logger

from .lslconfig import use_loopback_discovery

use_loopback_discovery()  # before liblsl loads
from mne_lsl.player import PlayerLSL  # noqa: E402


class MarkerPlayer(PlayerLSL):
    """PlayerLSL whose annotations go out as ``<name>-markers`` (descriptions as strings),
    stamped at their onset sample's LSL time, and which can wait for a first consumer before
    its first sample (so that a decoder sees the recording from its start)."""

    def __init__(self, raw, *, name: str, chunk_size: int = 10, n_repeat: int | float = 1,
                 markers: bool = True, wait_s: float = 0.0):
        super().__init__(raw, chunk_size=chunk_size, n_repeat=n_repeat, name=name,
                         annotations=markers and len(raw.annotations) > 0,
                         annotations_encoding="string")
        self.wait_s = wait_s
        self._waited = False
        if self._annotations:
            from mne_lsl.lsl import StreamInfo

            info = StreamInfo(name=f"{name}-markers", stype="Markers", n_channels=1,
                              sfreq=0.0, dtype="string", source_id=f"{name}-markers")
            info.set_channel_names(["marker"])
            info.set_channel_types("annotations")
            self._sinfo_annotations = info

    def _stream(self) -> None:
        if not self._waited:
            self._waited = True
            if self.wait_s > 0 and self._outlet.wait_for_consumers(self.wait_s):
                logger.info("replay: a consumer connected; streaming")
            from mne_lsl.lsl import local_clock

            self._target_timestamp = local_clock()
        if self._start_idx >= self._raw.times.size and self._n_repeated >= self._n_repeat:
            # a recording whose length is a multiple of chunk_size ended on the last chunk;
            # PlayerLSL would push an empty chunk and warn ("should not happen"): end here
            self._del_outlets()
            self._reset_variables()
            return
        super()._stream()

    def _stream_annotations(self, start: int, stop: int, start_timestamp: float) -> None:
        # PlayerLSL stamps an annotation one sample before its onset sample (the chunk's
        # first sample has start_timestamp + 1/sfreq); stamp it at the onset sample instead
        super()._stream_annotations(start, stop, start_timestamp + 1 / self.info["sfreq"])

    @property
    def finished(self) -> bool:
        return self._waited and self._outlet is None


def with_markers(raw, path: Path | None):
    """``raw`` with annotations for its events: its own, else the BIDS events sidecar's
    ``stim_file`` (or ``trial_type``), else its stim channel's values."""
    import mne

    if len(raw.annotations):
        return raw, "annotations"
    events_tsv = None if path is None else path.with_name(
        path.name.rsplit("_", 1)[0] + "_events.tsv")
    if events_tsv is not None and events_tsv.is_file():
        table = read_tsv(events_tsv, what="events file")
        column = next((c for c in ("stim_file", "trial_type", "value") if c in table), None)
        if "onset" in table and column is not None:
            raw.set_annotations(mne.Annotations(table["onset"].to_numpy(float), 0.0,
                                                table[column].astype(str).to_numpy()))
            return raw, f"{events_tsv.name} ({column})"
    stim = mne.pick_types(raw.info, meg=False, stim=True)
    if len(stim):
        events = mne.find_events(raw, stim_channel=raw.ch_names[stim[0]], verbose=False)
        onsets = (events[:, 0] - raw.first_samp) / raw.info["sfreq"]
        raw.set_annotations(mne.Annotations(onsets, 0.0, events[:, 2].astype(str)))
        return raw, f"stim channel {raw.ch_names[stim[0]]}"
    raise DataError("replay.markers=true, but the recording has no annotations, no BIDS "
                    "events sidecar and no stim channel", path=path)


#: duration of a replayed chunk with ``chunk_size=None`` (``replay.chunk_size=auto``): an
#: acquisition system sends packets at a fixed period, whatever its sampling rate
CHUNK_S = 0.01


def replay(file: str | Path, *, name: str, markers: bool = False,
           chunk_size: int | None = None, repeat: int | float = 1,
           wait_s: float = 30.0) -> MarkerPlayer:
    """Start replaying ``file`` in chunks of ``chunk_size`` samples (None: :data:`CHUNK_S`
    of them, at least 1); returns the running player (``stop()`` ends it)."""
    import mne

    path = Path(file)
    if not path.is_file():
        raise DataError("recording not found", path=path)
    try:
        raw = mne.io.read_raw(path, preload=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - mne raises many types for unreadable files
        raise DataError(f"cannot read the recording with MNE ({exc})", path=path) from exc
    if chunk_size is None:
        chunk_size = max(1, round(CHUNK_S * raw.info["sfreq"]))
    n = len(raw.times)
    # two PlayerLSL (1.14) edge cases: a short last chunk is stamped as a full one (a false
    # gap at the end), and when looping, a file of whole chunks is re-sent whole at the wrap
    # (20 s of timestamps back): one pass ends on a whole chunk, a loop never does
    keep = n - n % chunk_size if repeat == 1 else (n - 1 if n % chunk_size == 0 else n)
    if 0 < keep < n:
        raw.crop(tmax=raw.times[keep - 1])
    source = None
    if markers:
        raw, source = with_markers(raw, path)
    player = MarkerPlayer(raw, name=name, chunk_size=chunk_size, n_repeat=repeat,
                          markers=markers, wait_s=wait_s).start()
    logger.info("replay: %s as LSL stream %r (%d channels, %g Hz, %.1f s in chunks of %d "
                "samples%s)%s", path.name, name, len(raw.ch_names), raw.info["sfreq"],
                raw.times[-1], chunk_size,
                "" if repeat == 1 else f", {repeat:g} passes",
                f"; markers {name}-markers from {source}" if markers else "")
    return player


def run(cfg) -> None:
    """Stage entry point (root config ``replay.yaml``): replay until the end (or Ctrl-C)."""
    r = cfg.replay
    repeat = math.inf if str(r.repeat) in ("inf", "-1") else int(r.repeat)
    player = replay(r.file, name=str(r.name), markers=bool(r.markers),
                    chunk_size=None if str(r.chunk_size) == "auto" else int(r.chunk_size),
                    repeat=repeat, wait_s=float(r.wait_s))
    try:
        while not player.finished:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if not player.finished:
            player.stop()
    logger.info("replay: done")
