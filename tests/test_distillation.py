"""Distillation: the loss is cross-entropy plus T^2-scaled KL to the teacher's softened probabilities (for
both head shapes), the teacher's probabilities travel with the labels, and the prune step trains with it."""

import numpy as np
import pytest
import tensorflow as tf

from kftune import distillation, models
from kftune import prune as pr
from kftune.errors import InputError


def _kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def _soften(p, t):
    s = np.exp(np.log(p) / t)
    return s / s.sum()


def test_the_loss_is_hinton_s_on_probabilities():
    student = np.array([[0.7, 0.2, 0.1]], "float32")
    teacher = np.array([[0.5, 0.4, 0.1]], "float32")
    target = tf.constant(np.concatenate([[[0.0]], teacher], axis=-1), tf.float32)
    hard = -np.log(0.7)
    for weight, temperature in [(0.0, 4.0), (1.0, 1.0), (0.5, 4.0)]:
        got = float(distillation.loss(weight, temperature)(target, tf.constant(student))[0])
        kl = _kl(_soften(teacher[0], temperature), _soften(student[0], temperature))
        assert got == pytest.approx((1 - weight) * hard + weight * temperature**2 * kl, rel=1e-4)
    # A student that already matches the teacher pays only the labels' share.
    same = float(distillation.loss(0.5, 4.0)(target, tf.constant(teacher))[0])
    assert same == pytest.approx(0.5 * -np.log(0.5), rel=1e-4)


def test_a_sigmoid_head_is_distilled_as_two_classes():
    target = tf.constant([[1.0, 0.9]], tf.float32)  # label 1, teacher says 0.9
    got = float(distillation.loss(1.0, 2.0)(target, tf.constant([[0.6]], tf.float32))[0])
    expected = 4.0 * _kl(_soften(np.array([0.1, 0.9]), 2.0), _soften(np.array([0.4, 0.6]), 2.0))
    assert got == pytest.approx(expected, rel=1e-4)
    assert float(distillation.accuracy(target, tf.constant([[0.6]]))[0]) == 1.0


def test_batches_carry_the_teacher_s_probabilities_beside_the_labels():
    k = models.keras()
    teacher = k.Sequential([k.Input((2,)), k.layers.Dense(3, activation="softmax")])
    images = np.random.default_rng(0).normal(size=(4, 2)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((images, np.array([0, 1, 2, 1]))).batch(4)
    _, target = next(iter(distillation.with_teacher(batches, teacher)))
    np.testing.assert_array_equal(target[:, 0], [0, 1, 2, 1])
    np.testing.assert_allclose(target[:, 1:], teacher(images).numpy(), rtol=1e-6)


@pytest.mark.parametrize("fields,message", [
    ({"prune_distill_weight": 1.5}, "`prune_distill_weight` must be in [0, 1]"),
    ({"prune_distill_temperature": 0.0}, "`prune_distill_temperature` must be in (0, 100]"),
])
def test_a_bad_distillation_setting_is_named(fields, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace("]", r"\]")):
        pr.PruneConfig(**fields)


def test_the_prune_step_trains_the_pruned_student_against_the_fine_tuned_teacher(digits_dir, trained_model_dir, tmp_path):
    config = pr.PruneConfig(prune_method="structured", target_sparsity=0.5, prune_epochs=1, prune_quantize="",
                            prune_allocation="uniform", prune_distill_weight=0.7, prune_distill_temperature=3.0)
    report = pr.prune(digits_dir, trained_model_dir, config, tmp_path, progress=lambda _: None, verbose=0)
    assert report.distill_weight == 0.7 and "soft labels (distillation weight 0.7)" in report.markdown()
    assert set(report.history) >= {"loss", "accuracy", "val_accuracy"} and report.after["accuracy"] > 0.5
    model, meta = models.load(tmp_path)
    assert meta.hyperparameters["prune"]["prune_distill_weight"] == 0.7
    assert model.get_layer("conv0").kernel.shape[-1] == 16
