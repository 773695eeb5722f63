"""The bundled trainer: `python -m training.train` fits an LLM Diff Adapter to a base UNet.

See training/train.py for the command line and training/losses.py for the loss.
"""
