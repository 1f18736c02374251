"""launch: the Accelerate-based runner (rank-zero decompose-and-save barrier, training loop,
TensorBoard, checkpoints). It builds on ``lowrank``; ``lowrank`` never imports it."""

# Imported before any process group exists. Importing torch._dynamo once one does (PyTorch's FLOP
# counter imports it, in lowrank.count_flops) keeps references to the default group (torch 2.14), so
# destroy_process_group cannot stop gloo's worker threads; one still releasing a collective's tensors
# when the interpreter finalizes aborts the process ("terminate called without an active exception"),
# now and then, after the work is done. pytorch/pytorch#190489.
import torch._dynamo  # noqa: F401
