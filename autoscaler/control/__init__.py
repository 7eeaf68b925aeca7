"""The control path: reconcile loops over the Machines API, and wakes for the proxy."""
