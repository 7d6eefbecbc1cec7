"""The MEG decoder (:mod:`neurorecon.pipelines.inference`)."""

from __future__ import annotations

import functools
import time

import numpy as np
import pandas as pd
import torch

from neurorecon.models.common.checks import DataError, check_columns, check_finite
from neurorecon.models.common.logging import logger

from .base import Decoder, encode_batches


class MegDecoder(Decoder):
    """A MEG decoder: continuous recordings or stream windows -> embeddings.

    Adds the MEG recipe (:attr:`meg_params`), :meth:`prepare_meg` (recording + onsets ->
    epochs), the streaming form (:meth:`streaming_filter`, :meth:`meg_window`) and a
    single-window fast path (the traced model) to :class:`Decoder`.
    """

    MODALITY = "meg"
    METHODS = ("meg_params", "prepare_meg", "warm_up", "streaming_filter", "meg_window")

    @functools.cached_property
    def meg_params(self):
        """The MEG recipe (:class:`~.preprocess.meg.MegParams`)."""
        from ..preprocess.meg import MegParams

        return MegParams.from_mapping(self.config.preprocessing["params"])

    def _meg_stats(self, subject: str) -> dict[str, np.ndarray]:
        """Frozen scaler ``center`` and ``scale``, ``good``-channel mask and artifact
        projectors (``ssp``, ``(n_chans, k)``) of ``subject``: the keywords of
        :func:`~.preprocess.meg.scale_epochs` (built once: the streaming decoder asks for them
        every window)."""
        label = self._label(subject)
        if label not in self._stats:
            info = self.config.subjects[label]
            self._stats[label] = {
                "center": np.asarray(info.scaler_center, np.float64),
                "scale": np.asarray(info.scaler_scale, np.float64),
                "good": np.asarray(info.good, bool),
                "ssp": np.asarray(info.ssp, np.float64).reshape(-1, info.n_chans).T}
        return self._stats[label]

    def prepare_meg(self, raw_or_array, *, subject: str, events=None,
                    sfreq: float | None = None) -> np.ndarray:
        """Continuous MEG -> model-ready epochs ``(n_events, n_chans, n_times)`` float32.

        The offline transform with the bundle's recipe and frozen statistics: band-pass
        (the recipe's ``phase``), decimation, epochs ``[tmin, tmax]`` around each onset,
        baseline, the subject's artifact projectors and scaler fitted on its training data,
        clamp, bad channels zeroed.

        Parameters
        ----------
        raw_or_array : mne.io.Raw | ndarray
            A recording holding (at least) the bundle's channels, or an array
            ``(n_chans, n_samples)`` in the bundle's channel order at ``sfreq`` (default: the
            training recordings' rate).
        subject : str
            Subject label.
        events : DataFrame | sequence of float
            Image onsets in seconds (a table with an ``onset`` column, e.g. BIDS events).
        """
        import mne

        from ..preprocess.meg import cut_epochs, filter_and_decimate, scale_epochs

        info = self.subject_info(subject)
        params = self.meg_params
        names = list(info.ch_names)
        if isinstance(raw_or_array, mne.io.BaseRaw):
            raw = raw_or_array
            missing = [c for c in names if c not in raw.ch_names]
            if missing:
                raise DataError(f"the recording lacks {len(missing)} of the decoder's "
                                f"{len(names)} channels (e.g. {missing[:3]})",
                                path=(raw.filenames or [None])[0],
                                hint="use a recording of the same MEG system and channel set")
            raw = raw.copy().pick(names).load_data(verbose=False)
            raw.reorder_channels(names)
            newly_bad = sorted(set(raw.info["bads"]) - set(info.bads))
            if newly_bad:
                logger.warning("channels %s are marked bad in this recording but the decoder "
                               "was trained with them", newly_bad[:5])
            with raw.info._unlock():
                raw.info["bads"] = []
        else:
            data = np.asarray(raw_or_array, dtype=np.float64)
            if data.ndim != 2 or data.shape[0] != len(names):
                raise DataError(f"MEG array must be continuous (n_chans={len(names)}, "
                                f"n_samples), got shape {data.shape}",
                                hint="pass an mne Raw, or the channels in the bundle's order")
            rate = float(sfreq or info.sfreq_in)
            raw = mne.io.RawArray(data, mne.create_info(names, rate, "mag"), verbose=False)
        if events is None:
            raise DataError("prepare_meg needs the image onsets (events=) to cut epochs",
                            hint="pass the events table (onset in s) or a list of onsets")
        table = (events if isinstance(events, pd.DataFrame)
                 else pd.DataFrame({"onset": np.asarray(events, float)}))
        check_columns(table, ["onset"], path=None)
        check_finite(raw.get_data()[:, :: max(1, len(raw.times) // 20000)], path=None,
                     what="MEG data")
        raw = filter_and_decimate(raw, params)
        X = cut_epochs(raw, table, params)
        return scale_epochs(X, clamp=params.clamp, **self._meg_stats(subject)).astype(np.float32)

    def warm_up(self, subject: str, *, mask: np.ndarray | None = None,
                split: str | None = None) -> None:
        """Decode one empty window of ``subject`` (MEG) as :meth:`encode` and :meth:`retrieve`
        would with ``mask`` and ``split``: the traced single-window model and the gallery index
        are built now, and TorchScript's first (profiling) runs done, not in the first live
        windows."""
        info = self.subject_info(subject)
        for _ in range(3):
            emb = self.encode(np.zeros((len(info.ch_names), info.n_times), np.float32),
                              subject=subject, mask=mask)
        if self.gallery is not None:
            self.retrieve(emb, split=split)

    def streaming_filter(self, subject: str, *, sfreq: float | None = None):
        """The causal filter state for one stream of ``subject`` (chunks in, decimated out).

        Raises :class:`DataError` for a bundle trained with zero-phase filtering, which a
        stream cannot reproduce.
        """
        from ..preprocess.meg import StreamingMegFilter

        params = self.meg_params
        info = self.subject_info(subject)
        if params.phase != "causal":
            raise DataError(
                "this MEG decoder was trained on zero-phase (non-causal) filtered data, which "
                "a live stream cannot reproduce", path=self.root,
                hint="train a causal one: neurorecon run data=<...> preprocess.meg.phase=causal")
        return StreamingMegFilter(sfreq=float(sfreq or info.sfreq_in),
                                  n_chans=len(info.ch_names), params=params)

    def meg_window(self, window: np.ndarray, *, subject: str) -> np.ndarray:
        """One window ``(n_chans, n_times)`` of :meth:`streaming_filter` output spanning the
        recipe's ``[tmin, tmax]`` around an onset -> the model input (baseline, artifact
        projectors, frozen scaler, clamp, bad channels zeroed), equal to the offline causal
        epoch."""
        from ..preprocess.meg import prepare_window

        params = self.meg_params
        info = self.subject_info(subject)
        shape = (len(info.ch_names), info.n_times)
        window = np.asarray(window)
        if window.shape != shape:
            raise DataError(f"MEG window of shape {window.shape}; sub-{subject} needs {shape} "
                            f"(channels x samples of [{params.tmin}, {params.tmax}] s at "
                            f"{params.sfreq:g} Hz)")
        return prepare_window(window, params, **self._meg_stats(subject)).astype(np.float32)

    # ------------------------------------------------------------------ the modality's parts
    def _trial_shape(self, info) -> tuple[int, ...]:
        return (len(info.ch_names), info.n_times)

    def stim_column(self, spec) -> str:
        return spec.stim_column

    @property
    def average_test_repeats(self) -> bool:
        return bool(self.meg_params.average_test_repeats)

    def prepare_recording(self, rec, events: pd.DataFrame, spec
                          ) -> tuple[np.ndarray, pd.DataFrame]:
        from ..preprocess.meg import read_raw

        return self.prepare_meg(read_raw(rec), subject=rec.subject, events=events), events

    def _model_inputs(self, subject: str) -> dict[str, torch.Tensor]:
        """The subject's sensor positions, good channels and sensor kinds (built once)."""
        if subject not in self._inputs:
            from neurorecon.models.meg.brain_module import sensor_features

            info = self.subject_info(subject)
            self._inputs[subject] = {
                "positions": torch.tensor(info.positions, dtype=torch.float32),
                "mask": torch.tensor(info.good, dtype=torch.bool),
                "sensors": sensor_features(info.kinds, np.asarray(info.orientation,
                                                                     np.float32)),
            }
        return self._inputs[subject]

    def encode(self, x, *, subject: str, head: str = "clip", batch_size: int = 256,
               mask: np.ndarray | None = None) -> np.ndarray:
        """:meth:`Decoder.encode`, with ``mask``: a bool per bundle channel, False for
        channels to leave out of the spatial attention (missing or faulty in a stream); the
        bundle's bad channels stay out whatever it says. A single window runs the model
        traced for single windows (the real-time decoder's case)."""
        subject, x = self._trials(x, subject)
        inputs = self._model_inputs(subject)
        if mask is not None:
            keep = np.asarray(mask, bool)
            if keep.shape != (x.shape[1],):
                raise DataError(f"mask must hold one bool per channel ({x.shape[1]}), got "
                                f"shape {keep.shape}")
            inputs = {**inputs, "mask": inputs["mask"] & torch.from_numpy(keep)}
        if len(x) == 1 and head in ("clip", "mse") and bool(inputs["mask"].any()) \
                and self._state[0].device.type == "cpu":
            with torch.inference_mode():
                out = self._traced_window(subject, head)(torch.from_numpy(x), inputs["mask"][None])
            return out.reshape(1, -1).numpy()
        return encode_batches(self.subject_net(subject), x, subject=self._net_subject(subject),
                              inputs=inputs, head=head, batch_size=batch_size)

    @functools.cached_property
    def _state(self) -> list[torch.Tensor]:
        """The model's parameters and buffers (listing them walks every module: ~0.3 ms)."""
        nets = [self.net, *self.subject_nets.values()]
        return [t for net in nets for t in (*net.parameters(), *net.buffers())]

    def _traced_window(self, subject: str, head: str):
        """The model traced for single windows of ``subject`` and output ``head`` (the
        real-time decoder's case: :meth:`MegBrainModule.trace_window`), traced again when the
        weights change."""
        version = sum(t._version for t in self._state)
        if self._traced.get((subject, head), (None,))[0] != version:
            t0 = time.perf_counter()
            inputs = self._model_inputs(subject)
            self._traced[subject, head] = (version, self.subject_net(subject).trace_window(
                positions=inputs["positions"], sensors=inputs["sensors"], head=head,
                subject=self.config.subjects[subject].index))
            logger.info("decoder: model traced for single windows of sub-%s (%s head) in "
                        "%.2f s", subject, head, time.perf_counter() - t0)
        return self._traced[subject, head][1]
