"""Running generated code: the sandbox (the only code that executes programs), its child process, labelling, and the labelled-dataset builder."""
