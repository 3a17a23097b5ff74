"""kftune's own Keras layers, registered so that models using them load in safe mode."""

import kftune  # noqa: F401, I001 - selects tf-keras before TensorFlow is imported
import tf_keras


@tf_keras.saving.register_keras_serializable(package="kftune")
class CaffePreprocess(tf_keras.layers.Layer):
    """VGG16's and ResNet50's ImageNet preprocessing (RGB to BGR, ImageNet mean subtracted).

    keras.applications does this in a Python function; as a layer it is part of
    the saved model (a Lambda layer would not load in safe mode).
    """

    def call(self, inputs):
        import tensorflow as tf

        bgr = tf.reverse(inputs, axis=[-1])
        return bgr - tf.constant([103.939, 116.779, 123.68], dtype=bgr.dtype)
