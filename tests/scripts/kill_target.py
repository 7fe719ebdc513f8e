"""The BERT recipe, unchanged, with Inf gradients injected at fixed optimizer steps (for kill-and-resume tests).

Run it as the recipe: ``python -m tests.scripts.kill_target --output_dir ... [recipe flags]``. The poisoned steps
depend on ``state.global_step`` only, so a resumed run poisons the same steps again when it replays them.
"""

from __future__ import annotations

import hf_stability.trainer as trainer_module  # noqa: E402
from hf_stability.pretrain.run import main  # noqa: E402
from tests.integration.recipes.recipe_utils import load_recipe  # noqa: E402
from tests.testing_utils import PoisonGradient  # noqa: E402

POISONED_STEPS = (6, 13, 22, 31)  # `global_step` when the step begins: skip events at 7, 14, 23, 32


class PoisonedStabilityTrainer(trainer_module.StabilityTrainer):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), PoisonGradient(POISONED_STEPS)]
        super().__init__(*args, **kwargs)


if __name__ == "__main__":
    trainer_module.StabilityTrainer = PoisonedStabilityTrainer  # main() imports it when it builds the trainer
    main(load_recipe("bert").BERT)
