"""tunesmith: fine-tune pretrained models on your own data from one YAML file or one call.

    import tunesmith
    result = tunesmith.train("configs/rotten_tomatoes.yaml", {"train.lr": 3e-5})
    print(result.metrics["accuracy"], result.run_dir)
    tunesmith.predict(result.run_dir, "new.csv", "preds.csv")
"""

from .config import Config, load_config
from .errors import TunesmithError
from .inference import evaluate, predict
from .train import TrainResult, train

__all__ = ["Config", "TrainResult", "TunesmithError", "evaluate", "load_config", "predict", "train"]
__version__ = "0.1.0"
