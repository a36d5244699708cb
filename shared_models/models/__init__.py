"""The seed papers' architectures and a DP logistic baseline, one per module, all DP-trainable."""

from shared_models.models.base import HEAD_ORDER, ModelConfig, OutputHeads, StudentModel
from shared_models.models.cnn_lstm import CNNConfig, CNNLSTMConfig, CNNLSTMModel
from shared_models.models.gru import GRUConfig, GRUModel
from shared_models.models.logistic import LogisticConfig, LogisticModel, engineered_features
from shared_models.models.lstm import LSTMConfig, LSTMModel
from shared_models.models.lstm_gru import LSTMGRUConfig, LSTMGRUModel
from shared_models.models.multitask import MultiTaskConfig, MultiTaskLSTM, engagement_target

__all__ = [
    "HEAD_ORDER",
    "CNNConfig",
    "CNNLSTMConfig",
    "CNNLSTMModel",
    "GRUConfig",
    "GRUModel",
    "LSTMConfig",
    "LSTMGRUConfig",
    "LSTMGRUModel",
    "LSTMModel",
    "LogisticConfig",
    "LogisticModel",
    "ModelConfig",
    "MultiTaskConfig",
    "MultiTaskLSTM",
    "OutputHeads",
    "StudentModel",
    "engagement_target",
    "engineered_features",
]
