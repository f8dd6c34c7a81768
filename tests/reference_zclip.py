"""The oracle of `distclip.ZClip`: its reference code, transcribed."""


class ReferenceZClip:
    """The reference ZClip (bluorion-com/ZClip, zclip/zclip.py: `step`, `_compute_clip_val`, `_apply_clipping`,
    `_update_ema`), transcribed to plain Python on a given sequence of global norms: `step(norm)` returns the
    norm the gradients are clipped to (the norm itself where nothing clips)."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25, mode="zscore",
                 clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False):
        self.alpha, self.z_thresh, self.max_grad_norm, self.eps = alpha, z_thresh, max_grad_norm, eps
        self.warmup_steps, self.mode, self.clip_option = warmup_steps, mode, clip_option
        self.clip_factor, self.skip_update_on_spike = clip_factor, skip_update_on_spike
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def step(self, total_norm):
        if not self.initialized:
            self.buffer.append(total_norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized, self.buffer = True, []
            return total_norm if self.max_grad_norm is None else min(total_norm, self.max_grad_norm)
        clip_val = self._compute_clip_val(total_norm)
        adaptive_clip = clip_val if clip_val is not None else total_norm
        effective = adaptive_clip if self.max_grad_norm is None else min(adaptive_clip, self.max_grad_norm)
        if not (clip_val is not None and self.skip_update_on_spike):
            x = clip_val if clip_val is not None else total_norm
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return effective

    def _compute_clip_val(self, grad_norm):
        std = self.var ** 0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            return threshold if grad_norm > threshold else None
        z = (grad_norm - self.mean) / (std + self.eps)
        if z > self.z_thresh:
            if self.clip_option == "adaptive_scaling":
                return (self.mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
            return self.mean
        return None
