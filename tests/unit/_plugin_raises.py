"""A plugin module whose import fails (a misconfigured plugin)."""

raise RuntimeError("the plugin needs SALESFORCE_REGION set")
