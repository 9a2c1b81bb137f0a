"""antinet-npu: Hugging Face causal LM -> ONNX -> CPU variants and QNN context binaries, measured honestly."""

__version__ = "0.1.0"


class AntinetError(Exception):
    """A problem the user can fix (bad config, missing input, unsupported model).

    The CLI prints it as one line and exits non-zero; programming errors keep their traceback.
    """
