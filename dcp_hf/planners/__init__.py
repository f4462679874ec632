from dcp_hf.planners.load import HFLoadPlanner
from dcp_hf.planners.save import HFSavePlanner

__all__ = ["HFLoadPlanner", "HFSavePlanner"]
