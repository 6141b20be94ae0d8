"""UCGM-T moved to `ucgm_core.systems.ucgm`, its shared pieces to `ucgm_core.systems.common`."""
# kept for one release, so that old imports keep working; import from the modules above instead
from ucgm_core.systems.common import ObjectiveOutput, RandomStateReplay, drop_labels  # noqa: F401
from ucgm_core.systems.ucgm import *  # noqa: F401,F403
