"""The reference trainer, run as ``python -m ncfast.train``.

``ncfast.train.data`` loads the data sets (digits, MNIST, Fashion-MNIST, CIFAR-10/100 and the
Gaussian mixture of paper 000 appendix B) and augments batches on their own device;
``ncfast.train.models`` holds the networks (CIFAR-style ResNet-18, DenseNet-121, VGG-11, MLP) with
the knobs of paper 002 (initialisation scale, output layer norm, logit scale T).
"""
