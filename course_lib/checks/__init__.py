"""Exercise checkers. Each tests a student's function on fresh random inputs against the library's reference
and explains a failure in plain words. Every checker returns the function later cells should use: the
student's when it is right, otherwise the library's (and it says so), so a notebook always runs to the end.
The library's version is marked: `checks.is_library(fn)` is True and `checks.library_note(fn)` says
"(library's version in use)", for later cells that report what they ran.

    ddim_step = checks.check_ddim_step(ddim_step)

Layout: `core` (run_check, the CHECKERS registry, the checkers' own generators) and one module per notebook,
`nb00` ... `nb08`; each checker is registered under its exercise id (`CHECKERS["1.3"] is check_pd_round`).
Checkers leave torch's global random state untouched (see `core`).
"""
from __future__ import annotations

from .core import (CHECKERS, FALLBACK, LIBRARY_NOTE, accept, advice_for, checker, draw_seed, explain_exception,
                   fall_back, fresh_generator, is_library, library_note, library_version, run_check)
from .nb00 import check_ddim_step, check_sliced_wasserstein, check_v_to_pred
from .nb01 import check_pd_loss, check_pd_round, check_pd_target
from .nb02 import check_guided_batches, check_guided_loss, check_guided_target, check_stage1
from .nb03 import check_make_pairs, check_reflow_round, check_rf_loss, check_straightness
from .nb04 import check_cond_reflow_loss, check_guided_velocity, check_lap1, check_onestep_loss
from .nb05 import check_cd_loss, check_consistency_fn, check_ict_pieces, check_multistep
from .nb06 import check_lcm_multistep, check_lcm_target, check_lora_merge
from .nb07 import check_gamma_sampler, check_tcd_loss, check_tcf
from .nb08 import check_discriminator_loss, check_distillation_loss, check_trailing_sample
from .nb09 import check_backward_simulate, check_dm_loss, check_fake_score_loss
from .nb10 import check_freeze_rule, check_gdd_losses, check_time_share
from .nb11 import check_refl_loss, check_segment_start, check_tscd_loss, check_unified_sampler
from .nb12 import check_pareto_front
from .nb13 import check_to_latents
from .nb14 import check_meanflow_target, check_scm_tangent, check_shortcut_target

__all__ = ["CHECKERS", "FALLBACK", "LIBRARY_NOTE", "accept", "advice_for", "checker", "draw_seed",
           "explain_exception", "fall_back", "fresh_generator", "is_library", "library_note", "library_version",
           "run_check",
           "check_v_to_pred", "check_ddim_step", "check_sliced_wasserstein",
           "check_pd_target", "check_pd_loss", "check_pd_round",
           "check_guided_target", "check_guided_loss", "check_stage1", "check_guided_batches",
           "check_rf_loss", "check_make_pairs", "check_straightness", "check_reflow_round",
           "check_guided_velocity", "check_cond_reflow_loss", "check_onestep_loss", "check_lap1",
           "check_consistency_fn", "check_cd_loss", "check_multistep", "check_ict_pieces",
           "check_lcm_target", "check_lcm_multistep", "check_lora_merge",
           "check_tcf", "check_tcd_loss", "check_gamma_sampler",
           "check_distillation_loss", "check_discriminator_loss", "check_trailing_sample",
           "check_dm_loss", "check_fake_score_loss", "check_backward_simulate",
           "check_gdd_losses", "check_freeze_rule", "check_time_share",
           "check_segment_start", "check_tscd_loss", "check_refl_loss", "check_unified_sampler",
           "check_pareto_front",
           "check_to_latents",
           "check_meanflow_target", "check_shortcut_target", "check_scm_tangent"]
