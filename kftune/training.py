"""One resumable fit, called by every stage that trains: search trials, k-fold refits, fine-tune phases, prune levels.

:func:`fit` is Keras' ``model.fit`` with a named place in a checkpoint folder,
so that a process killed part-way and started again resumes from its last
finished epoch, and a fit that has finished is not trained again. Per name, the
folder holds:

``<name>.epochs.json``
    each finished epoch's metrics, replaced atomically after every epoch. It
    survives a kill, so the history (and a search trial's score) counts the
    epochs trained before the kill too.
``<name>.backup/``
    Keras' BackupAndRestore checkpoint of the last finished epoch (model and
    optimizer); Keras deletes it once the fit has finished.
``<name>.weights.h5``
    the weights the fit hands on (the model as ``fit`` leaves it), when kept.
``<name>.done.json``
    the finished fit's history, written last and atomically: while it exists the
    fit is done, and running it again only loads its weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, models, storage


def epoch_log_file(checkpoint_dir: str | Path, name: str) -> Path:
    return Path(checkpoint_dir, f"{name}.epochs.json")


def weights_file(checkpoint_dir: str | Path, name: str) -> Path:
    return Path(checkpoint_dir, f"{name}.weights.h5")


def done_file(checkpoint_dir: str | Path, name: str) -> Path:
    return Path(checkpoint_dir, f"{name}.done.json")


def finished(checkpoint_dir: str | Path, name: str) -> dict[str, list[float]] | None:
    """The history of fit ``name`` if it is done, else None."""
    done = done_file(checkpoint_dir, name)
    return json.loads(done.read_text()) if done.exists() else None


def checkpoint_location(checkpoint_uri: str, step: str, settings: dict, dataset_dir: str | Path,
                        model_dir: str | Path) -> str:
    """Where one step's checkpoints go: ``<checkpoint_uri>/<step>/<key>``, or "" without a ``checkpoint_uri``.

    The key hashes the settings that shape the step's training, the dataset's fingerprint and the content of
    the model it starts from (:func:`kftune.models.content_fingerprint`): a retried pod, or a rerun with the
    same ``checkpoint_uri`` that starts from the same model, data and settings, finds them; any other run
    trains in a folder of its own, so nothing one run stored is resumed into another's model or replaced.
    """
    import hashlib

    if not checkpoint_uri:
        return ""
    made_by = {"settings": settings, "data_fingerprint": dataset.DatasetInfo.load(dataset_dir).fingerprint,
               "model": models.content_fingerprint(model_dir)}
    key = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:16]
    return f"{checkpoint_uri.rstrip('/')}/{step}/{key}"


def epochs_done(checkpoint_dir: str | Path, name: str) -> int:
    """How many epochs of fit ``name`` are logged as finished (also by a process killed since)."""
    log = epoch_log_file(checkpoint_dir, name)
    return len(json.loads(log.read_text())) if log.exists() else 0


def started(checkpoint_dir: str | Path, name: str) -> bool:
    """Whether fit ``name`` will take its weights from ``checkpoint_dir``: it is done, or it has a checkpoint of a
    finished epoch (Keras' BackupAndRestore restores it when the fit starts), so whatever set the model's weights
    before the fit need not run again."""
    return done_file(checkpoint_dir, name).exists() or any(Path(checkpoint_dir, f"{name}.backup").rglob("*.index"))


def _history(entries: list[dict]) -> dict[str, list[float]]:
    metrics = sorted({key for e in entries for key in e if key != "epoch"})
    return {m: [float(e[m]) for e in entries if m in e] for m in metrics}


def _epoch_hooks(checkpoint_dir: Path, name: str, after_epoch: Callable[[], None] | None,
                 callbacks: Sequence) -> list:
    """Per epoch, in this order: log its metrics, checkpoint it (Keras' BackupAndRestore), the caller's
    callbacks, then ``after_epoch``.

    The log is written before the checkpoint, so that it never lacks an epoch
    the checkpoint holds: a kill between the two retrains that one epoch and
    overwrites its entry, rather than leaving an epoch trained but never
    counted. ``after_epoch`` (the upload to object storage) comes last, once
    both are on disk.
    """
    k = models.keras()
    path = epoch_log_file(checkpoint_dir, name)

    class EpochLog(k.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            entries = json.loads(path.read_text()) if path.exists() else []
            entries = [e for e in entries if e["epoch"] != epoch]
            entries.append({"epoch": epoch, **{key: float(v) for key, v in (logs or {}).items()}})
            storage.write_atomically(path, json.dumps(sorted(entries, key=lambda e: e["epoch"])))

    hooks = [EpochLog(), k.callbacks.BackupAndRestore(str(checkpoint_dir / f"{name}.backup")), *callbacks]
    if after_epoch is not None:
        hooks.append(k.callbacks.LambdaCallback(on_epoch_end=lambda *_: after_epoch()))
    return hooks


def fit(
    model,
    name: str,
    train,
    checkpoint_dir: str | Path,
    *,
    epochs: int,
    validation=None,
    initial_epoch: int = 0,
    callbacks: Sequence = (),
    keep_weights: bool = True,
    after_epoch: Callable[[], None] | None = None,
    verbose: int = 2,
) -> dict[str, list[float]]:
    """Trains ``model`` resumably as fit ``name`` in ``checkpoint_dir``; returns its history, per metric per epoch.

    The history holds every epoch of the fit, also those trained by a process
    that was killed before this one. A fit already done is not trained again:
    its kept weights are loaded into ``model`` and its history returned.
    ``keep_weights=False`` keeps no weights file (a k-fold fold, whose model is
    not handed on). ``after_epoch`` is called once each epoch's log and
    checkpoint are written, and once more when the fit is done (the caller
    uploads the folder there).
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    done, weights = done_file(checkpoint_dir, name), weights_file(checkpoint_dir, name)
    if done.exists():
        if keep_weights:
            model.load_weights(weights)
        return json.loads(done.read_text())
    model.fit(train, validation_data=validation, epochs=epochs, initial_epoch=initial_epoch,
              callbacks=_epoch_hooks(checkpoint_dir, name, after_epoch, callbacks), verbose=verbose)
    log = epoch_log_file(checkpoint_dir, name)
    history = _history(json.loads(log.read_text()) if log.exists() else [])
    if keep_weights:
        # The partial name keeps the .h5 suffix, which selects Keras' HDF5 format.
        partial = weights.with_name(f".partial.{weights.name}")
        models.save_weights(model, partial)
        os.replace(partial, weights)
    storage.write_atomically(done, json.dumps(history))
    if after_epoch is not None:
        after_epoch()
    return history
