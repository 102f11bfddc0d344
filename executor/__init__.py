"""The executor: runs submissions stage by stage inside nsjail."""
