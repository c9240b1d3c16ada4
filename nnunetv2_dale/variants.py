"""Length variants of ``nnUNetTrainerDALE``, named like nnU-Net's ``nnUNetTrainer_Xepochs``."""
from nnunetv2_dale.trainer import nnUNetTrainerDALE


class nnUNetTrainerDALE_1epoch(nnUNetTrainerDALE):
    epochs = 1


class nnUNetTrainerDALE_2epochs(nnUNetTrainerDALE):
    epochs = 2


class nnUNetTrainerDALE_3epochs(nnUNetTrainerDALE):
    epochs = 3


class nnUNetTrainerDALE_5epochs(nnUNetTrainerDALE):
    epochs = 5


class nnUNetTrainerDALE_10epochs(nnUNetTrainerDALE):
    epochs = 10


class nnUNetTrainerDALE_20epochs(nnUNetTrainerDALE):
    epochs = 20


class nnUNetTrainerDALE_50epochs(nnUNetTrainerDALE):
    epochs = 50


class nnUNetTrainerDALE_100epochs(nnUNetTrainerDALE):
    epochs = 100


class nnUNetTrainerDALE_250epochs(nnUNetTrainerDALE):
    epochs = 250


class nnUNetTrainerDALE_500epochs(nnUNetTrainerDALE):
    epochs = 500
