// swift-tools-version:5.9
// The driftsync client for iOS (and macOS): the generated Swift bindings over the Rust library,
// shipped as an XCFramework that bindings/README.md says how to build (driftsyncFFI.xcframework,
// next to this file; it is not committed).
import PackageDescription

let package = Package(
    name: "Driftsync",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Driftsync", targets: ["Driftsync"]),
    ],
    targets: [
        // The Rust library (static, per architecture) with Headers/driftsyncFFI.h and
        // Headers/module.modulemap.
        .binaryTarget(name: "driftsyncFFI", path: "driftsyncFFI.xcframework"),
        // The generated bindings (Sources/Driftsync/driftsync.swift), checked against the Rust
        // API by `cargo test -p driftsync-ffi --test swift`.
        .target(name: "Driftsync", dependencies: ["driftsyncFFI"], path: "Sources/Driftsync"),
    ]
)
