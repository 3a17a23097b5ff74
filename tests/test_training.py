"""kftune.training: the one resumable fit that search trials, k-fold refits, fine-tune phases and prune levels call.

Its kill-and-resume behaviour is tested through each caller (tests/test_search.py, tests/test_finetune.py,
tests/test_reliability.py); these tests pin what a finished fit leaves and what running it again does.
"""

import json

import numpy as np
import pytest

from kftune import models, training


def _model():
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    k = models.keras()
    model = k.Sequential([k.Input((4,)), k.layers.Dense(3, activation="softmax")])
    return models.compile_model(model, 3)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0)
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16), (x, y)


def test_a_finished_fit_is_not_trained_again_and_hands_on_its_weights(data, tmp_path):
    batches, (x, y) = data
    model = _model()
    history = training.fit(model, "phase", batches, tmp_path, epochs=3, validation=batches, verbose=0)
    assert len(history["loss"]) == len(history["val_accuracy"]) == 3
    assert json.loads(training.done_file(tmp_path, "phase").read_text()) == history == training.finished(tmp_path,
                                                                                                        "phase")
    assert not list((tmp_path / "phase.backup").rglob("*.index")), "Keras drops the backup of a finished fit"
    # The final epoch's val_accuracy is the score of the weights handed on.
    assert model.evaluate(x, y, verbose=0)[1] == pytest.approx(history["val_accuracy"][-1], abs=1e-6)

    again = _model()
    assert training.fit(again, "phase", batches, tmp_path, epochs=3, validation=batches, verbose=0) == history
    for mine, kept in zip(again.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, kept)
    assert [e["epoch"] for e in json.loads(training.epoch_log_file(tmp_path, "phase").read_text())] == [0, 1, 2]


def test_a_fit_that_hands_nothing_on_keeps_no_weights(data, tmp_path):
    batches, _ = data
    calls = []
    training.fit(_model(), "fold1", batches, tmp_path, epochs=2, keep_weights=False,
                 after_epoch=lambda: calls.append(1), verbose=0)
    assert not training.weights_file(tmp_path, "fold1").exists()
    assert training.finished(tmp_path, "fold1")["loss"]
    assert len(calls) == 3, "after every epoch, and once the fit is done"
    assert training.finished(tmp_path, "other") is None


def test_started_tells_a_fit_that_will_take_its_weights_from_the_folder(data, tmp_path):
    """What prune asks before refitting a level: nothing yet, an epoch checkpointed (a kill), or done."""
    batches, _ = data
    assert not training.started(tmp_path, "level") and training.epochs_done(tmp_path, "level") == 0
    k = models.keras()

    class Killed(Exception):
        pass

    def die(epoch, logs):
        if epoch == 1:
            raise Killed  # after the epoch's log and checkpoint: BackupAndRestore keeps its backup

    with pytest.raises(Killed):
        training.fit(_model(), "level", batches, tmp_path, epochs=4, callbacks=[k.callbacks.LambdaCallback(
            on_epoch_end=die)], verbose=0)
    assert training.started(tmp_path, "level") and training.finished(tmp_path, "level") is None
    assert training.epochs_done(tmp_path, "level") == 2
    history = training.fit(_model(), "level", batches, tmp_path, epochs=4, verbose=0)
    assert len(history["loss"]) == 4 and training.started(tmp_path, "level")
    assert not training.started(tmp_path, "other")
