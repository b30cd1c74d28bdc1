"""The mutation list: documented options and formulas of the engine, each broken on purpose.

A mutation replaces ``original`` (which must occur exactly once in ``file``) by ``replacement``
and names the few ``tests`` (pytest arguments) that guard the behaviour: CPU time is scarce, so a
mutation runs only those. Keep ``original`` short but unique; when the code it quotes changes,
``python -m benchmarks.mutation`` stops with "stale mutation list" until it is updated here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    what: str = ""


T_INV = "tests/test_inversion.py"
T_FT = "tests/test_finetune.py"
T_EVAL = "tests/test_evaluation.py"
T_OPT = "tests/test_phantom_engine_options.py"
T_SEG = "tests/test_segmentation_metrics.py"
T_NAT = "tests/test_natural_objectives.py"
T_RET = "tests/test_retrieval.py"
T_ENGINE = "tests/test_engine_mutants.py"  # the tests written against this list's survivors

MUTATIONS: list[Mutation] = [
    # --- inversion -----------------------------------------------------------------------------
    Mutation("inv_cosine_schedule_constant", "medkt/inversion.py",
             "sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)",
             "sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)",
             (T_ENGINE, T_INV), "cosine learning-rate schedule replaced by a constant lr"),
    Mutation("inv_lr_schedule_ignored", "medkt/inversion.py",
             'if cfg.lr_schedule == "constant":', "if False:",
             (T_ENGINE, T_INV), "lr_schedule='constant' still anneals"),
    Mutation("inv_lr_min_ignored", "medkt/inversion.py",
             "T_max=cfg.steps, eta_min=cfg.lr_min)", "T_max=cfg.steps, eta_min=0.0)",
             (T_ENGINE, T_INV), "cosine schedule anneals to 0 instead of lr_min"),
    Mutation("inv_schedule_restarts_with_adam", "medkt/inversion.py",
             "        for _ in range(step):\n            sched.step()", "        pass",
             (T_ENGINE, T_INV), "a new Adam (next resolution stage, resume) restarts the schedule at lr"),
    Mutation("inv_tv_diagonals_ignored", "medkt/augment.py",
             "    if diagonals:\n", "    if False:\n",
             (T_ENGINE, T_INV), "tv_diagonals=True adds no diagonal terms"),
    Mutation("inv_tv_weight_ignored", "medkt/inversion_priors.py",
             "return self.weight * total_variation(reg, self.diagonals)", "return None",
             (T_ENGINE, T_INV), "TV regulariser dropped from the inversion loss"),
    Mutation("inv_tv_vertical_only", "medkt/augment.py",
             "tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3)) + (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))",
             "tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))",
             (T_ENGINE, T_INV), "TV without the horizontal differences"),
    Mutation("inv_l2_objective_is_l1", "medkt/inversion.py",
             'return (emb - ctx.text_emb).pow(2).sum(-1), sim', 'return (emb - ctx.text_emb).abs().sum(-1), sim',
             (T_ENGINE, T_INV), "the 'l2' objective computes an L1 distance"),
    Mutation("inv_cosine_objective_sign", "medkt/inversion.py",
             'return -sim, sim', 'return sim, sim',
             (T_INV,), "default objective minimises the cosine (control: must be caught)"),
    Mutation("inv_grad_clip_ignored", "medkt/inversion.py",
             "factor = (max_norm / norms).clamp(max=1.0)", "factor = torch.ones_like(norms)",
             (T_ENGINE, T_INV), "per-image gradient clip does nothing"),
    Mutation("inv_grad_clip_global", "medkt/inversion.py",
             "norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)", "norms = grad.norm().clamp_min(1e-12).expand(grad.shape[0])",
             (T_ENGINE, T_INV), "per-image clip becomes a global-norm clip"),
    Mutation("inv_augment_p_ignored", "medkt/augment.py",
             "apply = u[:, 0] < self.p", "apply = u[:, 0] < 1.0",
             (T_ENGINE, T_INV), "augment_p ignored: every view is transformed"),
    Mutation("inv_translate_halved", "medkt/augment.py",
             "(u[:, 3] * 2 - 1) * 2 * self.translate, (u[:, 4] * 2 - 1) * 2 * self.translate",
             "(u[:, 3] * 2 - 1) * self.translate, (u[:, 4] * 2 - 1) * self.translate",
             (T_ENGINE, T_INV), "translate is a fraction of the half-side, not of the side"),
    Mutation("inv_contrastive_scale_ignored", "medkt/inversion.py",
             "scale = ctx.settings.scale or float(backend.logit_scale)", "scale = float(backend.logit_scale)",
             (T_ENGINE, T_INV), "contrastive_scale ignored by the 'contrastive' objective"),
    Mutation("inv_early_stop_min_delta_ignored", "medkt/inversion_priors.py",
             "if mean_sim > self.best + self.min_delta:", "if mean_sim > self.best:",
             (T_ENGINE, "tests/test_resume_safety.py::test_early_stopping_state_survives_a_resume"),
             "early_stop_min_delta ignored"),
    # --- fine-tuning ---------------------------------------------------------------------------
    Mutation("ft_infonce_temperature_ignored", "medkt/infonce.py",
             "return (1.0 / temperature) if temperature else backend.logit_scale.detach().float()",
             "return backend.logit_scale.detach().float()",
             (T_ENGINE, T_FT), "FinetuneConfig.temperature ignored by InfoNCE"),
    Mutation("ft_infonce_wrong_targets", "medkt/infonce.py",
             "loss = F.cross_entropy(logits, targets)", "loss = F.cross_entropy(logits, torch.zeros_like(targets))",
             (T_ENGINE, T_FT), "InfoNCE targets every image at the first caption"),
    Mutation("ft_wise_alpha_squared", "medkt/finetune_controls.py",
             "p.copy_(p0 + self.alpha * (p - p0))", "p.copy_(p0 + self.alpha ** 2 * (p - p0))",
             (f"{T_OPT}::test_wise_alpha_zero_restores_start", f"{T_OPT}::test_wise_alpha_half_is_midpoint"),
             "WiSE-FT interpolates with alpha^2 (right at 0 and 1 only)"),
    Mutation("ft_select_patience_ignored", "medkt/finetune_controls.py",
             "return bool(self.patience and self._since >= self.patience)", "return False",
             (T_ENGINE, f"{T_OPT}::test_keep_best_restores_best_epoch"), "select patience never stops training"),
    Mutation("ft_keep_best_ignored", "medkt/finetune_controls.py",
             "            if self.keep_best:\n", "            if False:\n",
             (f"{T_OPT}::test_keep_best_restores_best_epoch",), "keep_best does not restore the best epoch"),
    Mutation("ft_grad_clip_ignored", "medkt/finetune.py",
             "torch.nn.utils.clip_grad_norm_(self.run.params, clip)", "pass",
             (T_ENGINE, T_FT), "fine-tuning grad_clip does nothing"),
    Mutation("ft_weight_decay_ignored", "medkt/finetune.py",
             "return cls(params, lr=lr, weight_decay=self.weight_decay,", "return cls(params, lr=lr, weight_decay=0.0,",
             (T_ENGINE, T_FT), "weight_decay not passed to the optimiser"),
    Mutation("ft_adamw_ignored", "medkt/finetune.py",
             'cls = torch.optim.AdamW if self.name == "adamw" else torch.optim.Adam', "cls = torch.optim.Adam",
             (T_ENGINE, T_FT), "optimizer='adamw' runs Adam"),
    Mutation("ft_distill_sign", "medkt/finetune_controls.py",
             "return self.weight * (1 - (emb * teacher[ridx.to(teacher.device)]).sum(-1)).mean()",
             "return self.weight * (1 + (emb * teacher[ridx.to(teacher.device)]).sum(-1)).mean()",
             (T_ENGINE, f"{T_OPT}::test_replay_and_distillation"), "distillation pushes away from the start model"),
    # --- evaluation ----------------------------------------------------------------------------
    Mutation("eval_top1_argmin", "medkt/evaluation.py",
             "pred = scores.argmax(1).tolist()", "pred = scores.argmin(1).tolist()",
             (T_EVAL,), "top-1 prediction is the lowest score (control)"),
    Mutation("eval_per_class_accuracy_off_diagonal", "medkt/evaluation.py",
             "per[c] = float(conf[i, i] / n)", "per[c] = float(conf[:, i].sum() / max(conf[:, i].sum() + n - conf[i, i], 1))",
             (T_ENGINE, T_EVAL), "per-class accuracy becomes a Jaccard-like ratio"),
    Mutation("eval_auroc_classes_swapped", "medkt/evaluation.py",
             "return auroc(p[y == k], p[y != k])", "return auroc(p[y != k], p[y == k])",
             (T_ENGINE, T_EVAL), "ClassificationResult.auroc returns 1 - AUROC"),
    Mutation("eval_auroc_labels_swapped", "medkt/evaluation.py",
             "y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])",
             "y = np.concatenate([np.zeros(len(pos)), np.ones(len(neg))])",
             (T_EVAL,), "auroc() scores the negatives as positives"),
    Mutation("eval_confusion_transposed", "medkt/evaluation.py",
             "confusion_matrix(labels, pred, labels=", "confusion_matrix(pred, labels, labels=",
             (T_ENGINE, T_EVAL), "confusion matrix rows = predicted instead of true"),
    Mutation("eval_probabilities_ignore_logit_scale", "medkt/evaluation.py",
             "z = self.logit_scale * np.asarray(self.scores, np.float64)", "z = np.asarray(self.scores, np.float64)",
             (T_ENGINE, T_EVAL), "probabilities ignore the model's temperature"),
    Mutation("eval_mean_similarity_is_max", "medkt/evaluation.py",
             "return torch.stack([(image_emb @ e.t()).mean(1) for e in text], 1)",
             "return torch.stack([(image_emb @ e.t()).max(1).values for e in text], 1)",
             (T_ENGINE, T_EVAL), "aggregate='mean_similarity' takes the best prompt"),
    Mutation("eval_cache_ignores_weights", "medkt/evaluation.py",
             "h = hashlib.sha256(weights_fingerprint(self.backend).encode())", "h = hashlib.sha256()",
             (T_ENGINE, T_EVAL), "on-disk embedding cache key ignores the weights"),
    Mutation("table_alignment_ignored", "medkt/utils.py",
             'sep = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(header))]', 'sep = ["---"] * len(header)',
             (T_ENGINE, T_EVAL), "markdown tables lose their right-aligned number columns"),
    # --- segmentation --------------------------------------------------------------------------
    Mutation("seg_dsc_is_iou", "medkt/segmentation/metrics.py",
             '"dsc": float(compute_dice(pt, gtt', '"dsc": float(compute_iou(pt, gtt',
             (T_SEG,), "DSC reports IoU"),
    Mutation("seg_nsd_tolerance_zero", "medkt/segmentation/metrics.py",
             "class_thresholds=[float(tolerance)]", "class_thresholds=[0.0]",
             (T_SEG,), "NSD tolerance ignored"),
    Mutation("seg_nsd_spacing_ignored", "medkt/segmentation/metrics.py",
             "spacing=None if spacing is None else [float(s) for s in spacing],", "spacing=None,",
             (T_SEG,), "NSD in pixels even when the spacing is known"),
    Mutation("seg_both_empty_scores_zero", "medkt/segmentation/metrics.py",
             'return {"dsc": 1.0, "nsd": 1.0, "iou": 1.0}', 'return {"dsc": 0.0, "nsd": 0.0, "iou": 0.0}',
             (T_SEG,), "an empty prediction of an empty mask scores 0"),
    # --- backends ------------------------------------------------------------------------------
    Mutation("backend_normalize_no_std", "medkt/backends/base.py",
             "return (x - mean) / std", "return x - mean",
             ("tests/test_preprocessing_parity.py", "-k", "open_clip_family"), "normalisation forgets the std"),
    # --- natural-image plug-ins ----------------------------------------------------------------
    Mutation("mlm_loss_ignores_labels", "medkt/backends/vilt.py",
             "labels.reshape(-1).to(logits.device), ignore_index=-100",
             "tokens['input_ids'].reshape(-1).to(logits.device), ignore_index=-100",
             (T_ENGINE, T_NAT, "tests/test_vilt_backend.py"), "MLM loss predicts the (masked) inputs, not the labels"),
    Mutation("mlm_plugin_labels_are_inputs", "medkt/natural/objectives.py",
             "return backend.mlm_loss(images, tok, labels)",
             'return backend.mlm_loss(images, tok, torch.where(labels == -100, labels, tok["input_ids"].cpu()))',
             (T_ENGINE, T_NAT), "the 'mlm' loss targets the masked inputs instead of the original tokens"),
    Mutation("clip_loss_one_sided", "medkt/infonce.py",
             "loss = 0.5 * (loss + F.cross_entropy(logits.t(), targets))", "loss = loss",
             ("tests/test_coca_backend.py::test_combined_loss_equals_open_clip_cocaloss",), "CLIP loss only image->text"),
    Mutation("clip_caption_temperature_ignored", "medkt/natural/objectives.py",
             'infonce_scale(backend, config.temperature)', "infonce_scale(backend, None)",
             (T_ENGINE, T_NAT), "'clip+caption' ignores FinetuneConfig.temperature"),
    Mutation("retrieval_rsum_not_percent", "medkt/natural/retrieval.py",
             'out["rsum"] = 100.0 * sum(', 'out["rsum"] = sum(',
             (f"{T_RET}::test_recall_hand_checked", f"{T_RET}::test_recall_matches_vilt_reference_formula"),
             "RSUM in fractions instead of percent"),
    Mutation("weights_digest_ignores_values", "medkt/checkpoints.py",
             "        h.update(t.detach().float().cpu().numpy().tobytes())\n    return h.hexdigest()",
             "    return h.hexdigest()",
             (T_ENGINE,), "the weights fingerprint ignores the weight values"),
    Mutation("retrieval_cache_key_ignores_identity", "medkt/natural/retrieval.py",
             '"identity": list(identity)})[:16]', '"identity": []})[:16]',
             (T_ENGINE, f"{T_RET}::test_pairwise_scorer_brute_force_and_resume"),
             "ITM score cache key ignores the model identity (weights fingerprint)"),
]
