"""tune_sota: search chapter 7's techniques for training an xresnet from scratch, with Ray Tune."""

__version__ = "0.1.0"

from tune_sota.config import Config, SearchSettings, Space, UserError, load_space  # noqa: E402
from tune_sota.results import load_history, load_trials  # noqa: E402

__all__ = ["Config", "SearchSettings", "Space", "UserError", "load_space", "load_trials", "load_history"]
