// Package csiconn dials a CSI driver's UNIX socket, shared by fusecsi's stand-in sidecars.
package csiconn

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Dial returns a client connection to a CSI endpoint given as a path or a unix:// URL. The
// connection is lazy: errors surface on the first call, which lets callers retry while the
// driver starts.
func Dial(address string) (*grpc.ClientConn, error) {
	path := strings.TrimPrefix(address, "unix://")
	if path == "" {
		return nil, fmt.Errorf("empty CSI address")
	}
	return grpc.NewClient("passthrough:///"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}),
	)
}

// Retry calls f until it succeeds or ctx ends, waiting interval between attempts, and reports
// each failure through logf.
func Retry(ctx context.Context, interval time.Duration, logf func(error), f func(context.Context) error) error {
	for {
		err := f(ctx)
		if err == nil {
			return nil
		}
		logf(err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}
