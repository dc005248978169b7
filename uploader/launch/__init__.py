"""Starting the daemon from the training process: the worker process handle, the callback, Sidecar."""
