from llmrec.training.losses.full_softmax import FullSoftmaxLoss

__all__ = ["FullSoftmaxLoss"]
