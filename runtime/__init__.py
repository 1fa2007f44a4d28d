"""Process helpers of the pipeline that never ship: the torchrun launcher that ties workers to golf's life."""
