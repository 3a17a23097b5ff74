"""Knowledge distillation: train a (pruned or smaller) student against a teacher's soft labels.

Hinton et al. (2015): the loss is ``(1 - w) * cross-entropy(labels, student) +
w * T^2 * KL(teacher_T || student_T)``, where ``p_T`` is ``p`` softened by the
temperature ``T``. kftune's models end in a softmax (or, for two classes, one
sigmoid), so softening works on their probabilities: ``softmax(log(p) / T)``
is exactly ``softmax(logits / T)``, without access to the logits.

The teacher's probabilities travel with the labels: each batch's target becomes
``[label, teacher probabilities...]``, so the student trains in an ordinary
``model.fit`` (through :func:`kftune.training.fit`), and its accuracy is still
reported as ``accuracy`` / ``val_accuracy``.
"""

from __future__ import annotations

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import models

EPSILON = 1e-7


def with_teacher(batches, teacher):
    """``(images, labels)`` batches as ``(images, [labels, teacher probabilities])``."""
    import tensorflow as tf

    def attach(images, labels):
        probabilities = tf.cast(teacher(images, training=False), tf.float32)
        labels = tf.reshape(tf.cast(labels, tf.float32), (-1, 1))
        return images, tf.concat([labels, probabilities], axis=-1)

    return batches.map(attach, num_parallel_calls=1)


def _two_columns(p):
    """(N, C) probabilities for both head shapes: one sigmoid unit becomes [1 - p, p]."""
    import tensorflow as tf

    return tf.concat([1.0 - p, p], axis=-1) if p.shape[-1] == 1 else p


def loss(weight: float, temperature: float):
    """The distillation loss over targets ``[label, teacher probabilities...]`` and student probabilities."""
    import tensorflow as tf

    k = models.keras()

    def distillation_loss(target, probabilities):
        probabilities = tf.cast(probabilities, tf.float32)
        labels, teacher = target[:, :1], target[:, 1:]
        if probabilities.shape[-1] == 1:
            hard = k.losses.binary_crossentropy(labels, probabilities)
        else:
            hard = k.losses.sparse_categorical_crossentropy(labels, probabilities)
        student = tf.math.log(tf.clip_by_value(_two_columns(probabilities), EPSILON, 1.0)) / temperature
        soft = tf.nn.softmax(tf.math.log(tf.clip_by_value(_two_columns(teacher), EPSILON, 1.0)) / temperature)
        kl = tf.reduce_sum(soft * (tf.math.log(tf.clip_by_value(soft, EPSILON, 1.0)) - tf.nn.log_softmax(student)),
                           axis=-1)
        return (1.0 - weight) * hard + weight * temperature**2 * kl

    return distillation_loss


def accuracy(target, probabilities):
    """Accuracy against the label column of a distillation target."""
    k = models.keras()
    labels = target[:, :1]
    if probabilities.shape[-1] == 1:
        return k.metrics.binary_accuracy(labels, probabilities)
    return k.metrics.sparse_categorical_accuracy(labels, probabilities)


def compile_student(model, num_classes: int, learning_rate: float, weight: float, temperature: float):
    """Compiles ``model`` (Adam) with the distillation loss; ``accuracy`` still counts the labels."""
    models.output_head(num_classes)  # refuses fewer than 2 classes, as compile_model does
    model.compile(optimizer=models.keras().optimizers.Adam(float(learning_rate)),
                  loss=loss(float(weight), float(temperature)), metrics=[accuracy])
    return model
