//! patchlab: qualify security patches on throwaway clones of libvirt guests.
//! See ARCHITECTURE.md for the map of the modules and the rules they keep.

pub mod checks;
pub mod fingerprint;
pub mod guest;
pub mod hypervisor;
pub mod image;
pub mod inventory;
pub mod lab;
pub mod patch;
pub mod report;
pub mod rollout;
pub mod run;
