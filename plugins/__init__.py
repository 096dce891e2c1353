"""Built-in vetd plugins, registered the same way third-party ones are."""
