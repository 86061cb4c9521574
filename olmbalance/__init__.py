"""Balanced multimodal learning methods for any PyTorch training loop (needs only torch).

    from olmbalance import LogitModulator            # OLM's coefficients, plug and play
    from olmbalance import METHODS, build_method     # every method, behind the same hooks

Each method is one module; importing it registers it. The registry is filled here, by the
explicit imports below: adding a method is one new file and one line.
"""
from olmbalance.olm import LogitModulator, heldout_forward
from olmbalance.registry import METHODS, RunContext, Setting, build_method, method_entry, register_method
from olmbalance.base import Method

# The registry, in the order methods are listed.
from olmbalance import olm_methods  # noqa: F401,E402  olm, olm_loss_ratio, olm_mean
from olmbalance import unimodal  # noqa: F401,E402  audio_only, visual_only
from olmbalance import fusion_only  # noqa: F401,E402
from olmbalance import ogm_ge  # noqa: F401,E402
from olmbalance import g_blending  # noqa: F401,E402
from olmbalance import pmr  # noqa: F401,E402
from olmbalance import agm  # noqa: F401,E402
from olmbalance import mmpareto  # noqa: F401,E402
from olmbalance import mla  # noqa: F401,E402
# BalanceBenchmark's other methods, by its grouping: objective, optimization, feed-forward, data.
from olmbalance import mmcosine  # noqa: F401,E402
from olmbalance import unimodal_teacher  # noqa: F401,E402
from olmbalance import mbsd  # noqa: F401,E402
from olmbalance import cml  # noqa: F401,E402
from olmbalance import lfm  # noqa: F401,E402
from olmbalance import reconboost  # noqa: F401,E402
from olmbalance import relearning  # noqa: F401,E402
from olmbalance import opm  # noqa: F401,E402
from olmbalance import greedy  # noqa: F401,E402
from olmbalance import amco  # noqa: F401,E402
from olmbalance import modality_valuation  # noqa: F401,E402

__all__ = ["LogitModulator", "heldout_forward", "METHODS", "RunContext", "Setting", "Method",
           "build_method", "method_entry", "register_method"]
