"""Adapters to other libraries' sampling interfaces; each imports its library only when used:
``fewstep.integrations.diffusers`` (``FewstepScheduler``), ``fewstep.integrations.kdiffusion``
(``from_denoiser``, ``sampler``: k-diffusion itself is never imported)."""
