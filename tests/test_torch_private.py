"""The private torch internals slbi-triton relies on (listed in slbi_triton/torch_private.py)
still exist and behave as it needs: a torch upgrade that drops one fails here, by name."""

from slbi_triton import torch_private


def test_private_torch_internals_still_work() -> None:
    problems = torch_private.check()
    assert not problems, "this torch lacks internals slbi-triton needs:\n" + "\n".join(problems)
