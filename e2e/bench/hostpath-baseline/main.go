// Command hostpath-baseline is a minimal CSI node server that publishes the way
// kubernetes-csi/csi-driver-host-path does (bind mount through k8s.io/mount-utils, which
// execs mount(8) and umount(8)). It exists only as the Go baseline of
// e2e/bench/publish_cycle.py: the reference driver itself cannot be fetched here.
//
// Usage: hostpath-baseline --endpoint unix:///path/csi.sock --root DIR
package main

import (
	"context"
	"errors"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
	mount "k8s.io/mount-utils"
)

type server struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer
	root string
	// One driver-wide lock around the node calls, as the reference driver has.
	mu sync.Mutex
}

func (s *server) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: "hostpath-baseline.fusecsi.io", VendorVersion: "0"}, nil
}

func (s *server) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{}, nil
}

func (s *server) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

func (s *server) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: "bench"}, nil
}

func (s *server) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

// NodePublishVolume binds <root>/<volume_context["path"]> (or the root) on the target.
func (s *server) NodePublishVolume(_ context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if req.GetVolumeId() == "" || target == "" || req.GetVolumeCapability() == nil {
		return nil, status.Error(codes.InvalidArgument, "volume_id, target_path and volume_capability are required")
	}
	source := filepath.Join(s.root, req.GetVolumeContext()["path"])
	s.mu.Lock()
	defer s.mu.Unlock()

	mounter := mount.New("")
	notMounted, err := mounter.IsLikelyNotMountPoint(target)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		notMounted = true
	} else if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if !notMounted {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	options := []string{"bind"}
	if req.GetReadonly() {
		options = append(options, "ro")
	}
	if err := mounter.Mount(source, target, "", options); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the target if it is a mount point and removes the directory.
func (s *server) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if req.GetVolumeId() == "" || target == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id and target_path are required")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := mount.CleanupMountPoint(target, mount.New(""), true); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func main() {
	endpoint := flag.String("endpoint", "unix:///tmp/hostpath-baseline.sock", "unix:///path of the socket")
	root := flag.String("root", "/", "directory volumes live in")
	flag.Parse()

	path := strings.TrimPrefix(*endpoint, "unix://")
	_ = os.Remove(path)
	listener, err := net.Listen("unix", path)
	if err != nil {
		log.Fatalf("listen on %s: %v", path, err)
	}
	grpcServer := grpc.NewServer()
	s := &server{root: *root}
	csi.RegisterIdentityServer(grpcServer, s)
	csi.RegisterNodeServer(grpcServer, s)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		grpcServer.GracefulStop()
	}()
	if err := grpcServer.Serve(listener); err != nil {
		log.Fatalf("serve: %v", err)
	}
	_ = os.Remove(path)
}
