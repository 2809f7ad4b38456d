"""Small-image architectures, registered in timm's registry so ``timm.create_model`` builds them."""

from bdaudit.models.small import BdCNN, PreActResNet18  # noqa: F401  (registers the models)

SMALL_MODELS = ("bd_cnn_tiny", "bd_cnn_small", "bd_cnn_medium", "preact_resnet18_cifar")
