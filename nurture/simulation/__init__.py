"""The in-process runtime: the simulator on a virtual clock, and scenario files played on any
runtime and compared with their expectations."""
