"""What lives in the bucket beside the checkpoints: commit pointers and their rules."""
