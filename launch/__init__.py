"""launch: the Accelerate-based runner (rank-zero decompose-and-save barrier, training loop,
TensorBoard, checkpoints). It builds on ``lowrank``; ``lowrank`` never imports it."""
