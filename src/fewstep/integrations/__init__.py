"""Adapters to other libraries' sampling interfaces; each imports its library only when used:
``fewstep.integrations.diffusers`` (``FewstepScheduler``)."""
