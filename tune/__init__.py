"""The Ray Tune + Optuna layer (installed as ``cdfkd.tune``): sweeps over the engine in ``cdfkd``.

Every Ray and Optuna import of the project lives in this package.
"""

from cdfkd.tune.run import run_sweep

__all__ = ["run_sweep"]
