"""tune_sota: search chapter 7's techniques for training an xresnet from scratch, with Ray Tune."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tune_sota")  # one source of truth: pyproject.toml, as installed
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from tune_sota.config import Config, SearchSettings, Space, UserError, load_space  # noqa: E402
from tune_sota.model import load_model  # noqa: E402
from tune_sota.results import load_confirm, load_history, load_trials  # noqa: E402

__all__ = ["Config", "SearchSettings", "Space", "UserError", "load_space", "load_trials", "load_history",
           "load_confirm", "load_model"]
