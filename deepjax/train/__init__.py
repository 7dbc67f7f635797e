"""Training: optimizer, state, losses, aux-loss-free balancing, the jitted step and the loop."""

from deepjax.train.loop import NonFiniteLoss, TrainConfig, evaluate, train
from deepjax.train.optimizer import OptimizerConfig, make_optimizer
from deepjax.train.run_config import default_config, resolve
from deepjax.train.state import TrainState, init_train_state
from deepjax.train.step import ObjectiveConfig, make_eval_step, make_train_step
