"""go_fast's second saving: reuse the UNet's deep features between neighbouring steps (DeepCache).

Between two denoising steps the deep, low-resolution part of the UNet changes little, while the
shallow, full-resolution part tracks the fine detail. Once the noise level is below the point
where the composition is set, only one step in a few runs the whole UNet (`engine.steps.whole_steps`
decides which, by sigma; the last step is always whole); the others run just the shallow path:
time embedding, `conv_in`, the first down block's resnets (its downsampler feeds only the deep
part), the last up block and the output layers, fed with the last full step's input to that up
block. The text (and IP-Adapter image) context is projected only when one of those two blocks
attends to it, which SDXL's do not. On SDXL the shallow path is about a tenth of the UNet's work.

Installed around one pipeline call by wrapping the UNet's forward and removed afterwards, so a
request without go_fast runs the plain pipeline. With a ControlNet, the shallow path adds only its
first residuals, and `engine.control.guided` computes only those on cached steps. A batch halved
by the guidance cutoff keeps the conditional half of the cached features, as the cutoff keeps the
conditional half of the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput


class DeepFeatureCache:
    """Counts the UNet calls of one pipeline call and decides which of them may reuse deep features."""

    def __init__(self, unet: UNet2DConditionModel, whole_steps: Callable[[], Sequence[bool]]) -> None:
        """`whole_steps` says which steps run the whole UNet; asked once, at the first step, when the
        pipeline has set its timesteps."""
        self.unet = unet
        self.whole_steps = whole_steps
        self.plan: Sequence[bool] | None = None
        self.calls = 0
        self.full_calls = 0
        self.features: torch.Tensor | None = None

    def is_full(self, step: int) -> bool:
        if self.features is None:
            return True
        if self.plan is None:
            self.plan = self.whole_steps()
        return step >= len(self.plan) or self.plan[step]

    @contextlib.contextmanager
    def installed(self) -> Iterator[DeepFeatureCache]:
        """The UNet's forward wrapped for the duration of one pipeline call."""
        full = self.unet.forward
        last_up = self.unet.up_blocks[-1]

        def remember(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self.features = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def forward(sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> Any:
            step, self.calls = self.calls, self.calls + 1
            if self.is_full(step):
                self.full_calls += 1
                return full(sample, timestep, encoder_hidden_states, **kwargs)
            return self._shallow(sample, timestep, encoder_hidden_states, **kwargs)

        hook = last_up.register_forward_pre_hook(remember, with_kwargs=True)
        self.unet.forward = forward
        try:
            yield self
        finally:
            del self.unet.forward  # the class's own forward again
            hook.remove()
            self.features = self.plan = None

    def _shallow(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        return_dict: bool = True,
        **_: Any,
    ) -> tuple[torch.Tensor] | UNet2DConditionOutput:
        """The UNet's own layers on the shallow path, in the order its forward runs them.

        A ControlNet's residuals are added to the skips they belong to, as the UNet adds them: the
        first ones (conv_in and the first down block) feed the last up block; the deeper ones and the
        mid-block residual only change the deep features, which this step reuses.
        """
        unet = self.unet
        assert self.features is not None
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        aug = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        first_attends, last_attends = (getattr(block, "has_cross_attention", False) for block in (first, last))
        if first_attends or last_attends:  # the context's projections (IP-Adapter's too) only when read
            encoder_hidden_states = unet.process_encoder_hidden_states(
                encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
            )
        attention = {"encoder_hidden_states": encoder_hidden_states, "cross_attention_kwargs": cross_attention_kwargs}
        hidden = unet.conv_in(sample)
        if first_attends:
            _, res = first(hidden_states=hidden, temb=emb, **attention)
        else:  # the block's own forward without its downsampler, whose output only the deep part reads
            res, state = [], hidden
            for resnet in first.resnets:
                state = resnet(state, emb)
                res.append(state)
        skips = ((hidden, *res))[: len(last.resnets)]
        if down_block_additional_residuals is not None:
            residuals = down_block_additional_residuals[: len(skips)]
            skips = tuple(skip + residual for skip, residual in zip(skips, residuals, strict=True))
        features = self.features
        if features.shape[0] != sample.shape[0]:  # the guidance cutoff halved the batch since
            features = features.chunk(features.shape[0] // sample.shape[0])[-1]
        context = attention if last_attends else {}
        out = last(hidden_states=features, temb=emb, res_hidden_states_tuple=skips, **context)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        out = unet.conv_out(out)
        return (out,) if not return_dict else UNet2DConditionOutput(sample=out)
