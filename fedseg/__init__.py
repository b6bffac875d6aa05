"""fedseg: federated nnU-Net-style 3D segmentation on Flower."""

__version__ = "0.1.0"
