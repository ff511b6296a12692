"""Source formats: the disk-image readers and the detection that picks one."""
